"""Joining a run: start the peer, find a peer that serves the run, fetch its config, open the replica.

Shared by `join` (workers), `pull` (over P2P) and `bootstrap` (the small authority peer for tests).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from nord.checkpoint import load_checkpoint
from nord.config import RunConfig
from nord.crdt import Replica
from nord.crdt.log import Store
from nord.errors import ConfigError, MergeError, TransportError
from nord.gossip import RunNotFound, fetch_run_config_json, fetch_snapshot, hello
from nord.model import NordLM
from nord.transport import Transport, TransportConfig, peer_id_of

log = logging.getLogger(__name__)
T = TypeVar("T")

# A stream that ended early is worth another try; a refusal, a timeout or a wrong run is not.
TRANSIENT = ("closed the stream",)


def with_retries(what: str, fetch: Callable[[], T], *, attempts: int = 3, delay_s: float = 1.0) -> T:
    """`fetch()`, tried again after a transient transport failure (up to `attempts` times in all)."""
    for attempt in range(1, attempts):
        try:
            return fetch()
        except TransportError as e:
            if not any(t in str(e) for t in TRANSIENT):
                raise
            log.warning("%s failed (%s); trying again (%d of %d)", what, e, attempt + 1, attempts)
            time.sleep(delay_s * attempt)
    return fetch()


def peer_ids(initial_peers: tuple[str, ...]) -> tuple[str, ...]:
    """The peer ids inside `/.../p2p/<id>` multiaddrs."""
    return tuple(peer_id_of(m) for m in initial_peers)


def start_transport(args, identity_path: Path | None) -> Transport:
    """A Transport from the common flags (--initial-peers, --host-maddrs, --announce-maddrs, ...)."""
    config = TransportConfig(
        initial_peers=tuple(args.initial_peers or ()),
        host_maddrs=tuple(args.host_maddrs or ()),
        announce_maddrs=tuple(args.announce_maddrs or ()),
        client_mode=bool(getattr(args, "client_mode", False)),
        identity_path=str(identity_path) if identity_path else None,
        local_only=bool(args.local_only),
    )
    return Transport.start(config)


def find_run(transport: Transport, candidates: tuple[str, ...], run_id: str) -> str:
    """The first of `candidates` (peer ids) that serves `run_id`; one clear line if none does."""
    if not candidates:
        raise ConfigError(
            "no --initial-peers given: pass the run's bootstrap address (/ip4/.../p2p/<peer id>)"
        )
    problems = []
    for peer in candidates:
        try:
            hello(transport, peer, run_id)
            return peer
        except RunNotFound as e:
            problems.append(str(e))
        except TransportError as e:
            problems.append(str(e))
    raise TransportError(problems[0] if len(problems) == 1 else "; ".join(problems))


def fetch_run(transport: Transport, peer: str, run_id: str) -> tuple[RunConfig, str]:
    """The run's config (parsed and validated) and its JSON text as served."""
    text = with_retries("fetching the run config", lambda: fetch_run_config_json(transport, peer, run_id))
    run = RunConfig.from_json(text)
    if run.run_id != run_id:
        raise TransportError(
            f"peer {peer[-8:]} answered with the config of run {run.run_id!r}, not {run_id!r}"
        )
    if not run.authorities:
        raise ConfigError(f"run {run_id!r} names no authority keys: nobody could seal its rounds")
    return run, text


def model_spec(run: RunConfig) -> dict[str, tuple[int, ...]]:
    """The trainable tensors peers exchange (built on the meta device: no memory, no init cost)."""
    import torch

    with torch.device("meta"):
        model = NordLM(run.model)
    return model.param_spec()


def open_replica(run: RunConfig, replica_dir: Path, *, transport: Transport, source: str) -> Replica:
    """Resume the replica in `replica_dir`, or start one from `source`'s sealed snapshot."""
    spec = model_spec(run)
    authorities = [bytes.fromhex(k) for k in run.authorities]
    if Store(replica_dir).exists:
        replica = Replica.open(replica_dir, spec=spec, merge=run.merge, authorities=authorities)
        if replica.run_id != run.run_id:
            raise ConfigError(f"{replica_dir} holds a replica of run {replica.run_id!r}, not {run.run_id!r}")
        log.info("resumed replica at round %d from %s", replica.round, replica_dir)
        return replica
    with tempfile.TemporaryDirectory(prefix="nord-snapshot-") as tmp:
        out = Path(tmp) / "snapshot.safetensors"
        path = with_retries(
            "fetching the sealed snapshot", lambda: fetch_snapshot(transport, source, run.run_id, out)
        )
        tensors, meta = load_checkpoint(path)
    try:
        replica = Replica.from_snapshot(
            tensors, meta, spec=spec, merge=run.merge, authorities=authorities, log_dir=replica_dir
        )
    except MergeError as e:
        raise TransportError(f"peer {source[-8:]} sent an unusable snapshot: {e}") from None
    log.info("started replica at round %d from peer %s's snapshot", replica.round, source[-8:])
    return replica
