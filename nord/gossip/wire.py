"""Wire helpers of the gossip protocol, and the calls a joining peer makes before it has a replica.

Requests and replies are msgpack maps naming the run; deltas travel as `nord.crdt.Delta` bytes, at most
SYNC_BUDGET_BYTES of envelopes per message (the caller asks again while the reply says `more`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from nord.codec import CodecConfig
from nord.crdt import Delta
from nord.errors import MergeError, TransportError
from nord.fsutil import atomic_write_bytes
from nord.protocol import budgeted_count
from nord.transport import Transport

PEER_TTL_S = 60.0  # presence records expire unless refreshed by `heartbeat`
BACKOFF_S = 15.0  # a peer that failed a request is skipped this long
PUSH_TIMEOUT_S = 30.0  # a push that takes longer is left to anti-entropy
RECORD_TTL_S = 900.0  # contribution records
SYNC_BUDGET_BYTES = 32 << 20  # envelope bytes per sync reply; the caller asks again while `more`
SMALL_REQUEST_BYTES = 1 << 20
MAX_DELTA_BYTES = SYNC_BUDGET_BYTES + CodecConfig().max_payload_bytes + SMALL_REQUEST_BYTES
MAX_SNAPSHOT_BYTES = 16 << 30
MAX_TOKENIZER_BYTES = 64 << 20


class RunNotFound(TransportError):
    """The peer serves another run (or none)."""


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise TransportError(f"{what}: not valid msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise TransportError(f"{what}: expected a map")
    return obj


def delta_from(data: Any) -> Delta:
    if not isinstance(data, (bytes, bytearray)):
        raise TransportError("message carries no delta")
    try:
        return Delta.from_bytes(bytes(data))
    except MergeError as e:
        raise TransportError(f"malformed delta: {e}") from None


def within_budget(delta: Delta, budget: int) -> tuple[Delta, bool]:
    """Keep envelopes (in order) up to `budget` bytes (at least one); removals and seals always travel."""
    kept = budgeted_count([len(data) for data in delta.envelopes], budget)
    if kept == len(delta.envelopes):
        return delta, False
    return Delta(envelopes=delta.envelopes[:kept], removals=delta.removals, seals=delta.seals), True


def hello(transport: Transport, peer_id: str, run_id: str) -> dict[str, Any]:
    """Ask `peer_id` whether it serves `run_id`; RunNotFound (one line) if not."""
    try:
        reply = transport.request(
            peer_id, "hello", pack({"run_id": run_id}), max_reply_bytes=SMALL_REQUEST_BYTES
        )
    except TransportError as e:
        if "not found on this peer" in str(e):
            raise RunNotFound(str(e)) from None
        raise
    return unpack(reply, "hello reply")


def fetch_run_config_json(transport: Transport, peer_id: str, run_id: str) -> str:
    reply = transport.request(
        peer_id, "config", pack({"run_id": run_id}), max_reply_bytes=SMALL_REQUEST_BYTES
    )
    return reply.decode("utf-8")


def fetch_snapshot(transport: Transport, peer_id: str, run_id: str, out_path: str | Path) -> Path:
    """Download the peer's sealed snapshot to `out_path` (checked by the caller with load_checkpoint)."""
    data = transport.request(
        peer_id, "snapshot", pack({"run_id": run_id}), max_reply_bytes=MAX_SNAPSHOT_BYTES, timeout_s=600
    )
    atomic_write_bytes(out_path, data)
    return Path(out_path)


def fetch_tokenizer(transport: Transport, peer_id: str, run_id: str) -> bytes:
    return transport.request(
        peer_id, "tokenizer", pack({"run_id": run_id}), max_reply_bytes=MAX_TOKENIZER_BYTES
    )
