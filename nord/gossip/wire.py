"""Wire helpers of the gossip protocol, and the calls a joining peer makes before it has a replica.

Requests and replies are msgpack maps naming the run; deltas travel as `nord.crdt.Delta` bytes, at most
SYNC_BUDGET_BYTES of envelopes per message (the caller asks again while the reply says `more`).

Every field of a request is checked for type and shape here before a handler uses it (`request_of`,
`fetch_ids`; digests and deltas by nord.crdt), so a malformed request gets a one-line error naming the
field, never an "internal error".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from nord.checks import is_hex64, is_run_id
from nord.codec import CodecConfig
from nord.crdt import Delta
from nord.errors import MergeError, TransportError
from nord.fsutil import atomic_write_bytes
from nord.memory import count_params
from nord.model import ModelConfig
from nord.protocol import budgeted_count
from nord.transport import Transport
from nord.transport.peer import network_peer

PEER_TTL_S = 60.0  # presence records expire unless refreshed by `heartbeat`
BACKOFF_S = 15.0  # a peer that failed a request is skipped this long
PUSH_TIMEOUT_S = 30.0  # a push that takes longer is left to anti-entropy
RECORD_TTL_S = 900.0  # contribution records
SYNC_BUDGET_BYTES = 32 << 20  # envelope bytes per sync reply; the caller asks again while `more`
SMALL_REQUEST_BYTES = 1 << 20
MAX_DELTA_BYTES = SYNC_BUDGET_BYTES + CodecConfig().max_payload_bytes + SMALL_REQUEST_BYTES
SNAPSHOT_META_BYTES = 64 << 20  # a snapshot's window: folded ids, dots and round hashes, with room to spare
MAX_TOKENIZER_BYTES = 64 << 20
MAX_FETCH_IDS = 4096  # contribution ids in one fetch request (≈ 270 KB); pull_announced asks in several


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


def request_of(body: bytes, name: str, run_id: str) -> dict[str, Any]:
    """The msgpack map of a `name` request for `run_id`; TransportError if malformed, RunNotFound if it
    names another run."""
    req = unpack(body, f"{name} request")
    asked = req.get("run_id")
    if not is_run_id(asked):
        raise TransportError(f"{name} request: run_id is not a run id (got {_kind(asked)})")
    if asked != run_id:
        raise RunNotFound(f"run {asked!r} not found on this peer (it serves run {run_id!r})")
    return req


def fetch_ids(req: dict[str, Any]) -> set[str]:
    """The contribution ids a fetch request asks for: a list of at most MAX_FETCH_IDS 64-hex-digit ids."""
    ids = req.get("ids")
    if not isinstance(ids, list) or len(ids) > MAX_FETCH_IDS or not all(is_hex64(i) for i in ids):
        raise TransportError(
            f"fetch request: ids must be a list of at most {MAX_FETCH_IDS} contribution ids "
            f"(64 lowercase hex digits each), got {_kind(ids)}"
        )
    return set(ids)


def _kind(value: Any) -> str:
    """What a malformed field was, in a few words (never its possibly huge content)."""
    if isinstance(value, (list, dict, str, bytes)):
        return f"a {type(value).__name__} of length {len(value)}"
    return type(value).__name__ if value is not None else "nothing"


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


def hello_binding(run_id: str, network_id: str) -> bytes:
    """What a peer's signing key signs in its hello reply: that `network_id` speaks for it in `run_id`
    (libp2p authenticates the network id of a stream; this binds the key to it, for naming peers)."""
    return f"nord-hello\0{run_id}\0{network_id}".encode()


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
    try:
        return reply.decode("utf-8")
    except UnicodeDecodeError:
        raise TransportError(f"{network_peer(peer_id)} sent a run config that is not UTF-8 text") from None


def snapshot_max_bytes(model: ModelConfig) -> int:
    """The most a snapshot of `model` can take (fp32 weights + its window): a peer's reply past it is cut."""
    return 4 * count_params(model) + SNAPSHOT_META_BYTES


def fetch_snapshot(
    transport: Transport, peer_id: str, run_id: str, out_path: str | Path, *, max_bytes: int
) -> Path:
    """Download the peer's sealed snapshot to `out_path` (checked by the caller with load_checkpoint);
    `max_bytes` (snapshot_max_bytes of the run's model) bounds what a lying peer can make us take."""
    data = transport.request(
        peer_id, "snapshot", pack({"run_id": run_id}), max_reply_bytes=max_bytes, timeout_s=600
    )
    atomic_write_bytes(out_path, data)
    return Path(out_path)


def fetch_tokenizer(transport: Transport, peer_id: str, run_id: str) -> bytes:
    return transport.request(
        peer_id, "tokenizer", pack({"run_id": run_id}), max_reply_bytes=MAX_TOKENIZER_BYTES
    )
