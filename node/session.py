"""Joining a run: start the peer, find a peer that serves the run, fetch its config, open the replica.

Shared by `join` (workers), `pull` (over P2P) and `bootstrap` (the small authority peer for tests).

Trust: a run config counts only when one of its authorities signed it (`RunConfig.verify`) and, once a
fingerprint is pinned (`--authority`, or the one a worker stored at its first join), only when that
authority did. The signed config records the genesis weights hash, so round 0's weights are vouched for
too; every later state carries an authority seal (`Replica.from_snapshot`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from node.peers import PeerNames
from node.state import StateDir
from nord.checkpoint import load_checkpoint, weights_hash
from nord.checks import fingerprint
from nord.config import RunConfig, check_fingerprint
from nord.crdt import Replica
from nord.crdt.log import Store
from nord.errors import CheckpointError, ConfigError, MergeError, TransportError
from nord.gossip import fetch_run_config_json, fetch_snapshot, hello, snapshot_max_bytes
from nord.model import NordLM
from nord.transport import Transport, TransportConfig, peer_id_of
from nord.transport.peer import network_peer

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


def find_run(
    transport: Transport, candidates: tuple[str, ...], run_id: str, names: PeerNames | None = None
) -> str:
    """The first of `candidates` (peer ids) that serves `run_id` (its signing key, if its hello proves
    one, goes to `names`); one clear line if none does."""
    names = names or PeerNames(run_id)
    if not candidates:
        raise ConfigError(
            "no --initial-peers given: pass the run's bootstrap address (/ip4/.../p2p/<peer id>)"
        )
    problems = []
    for peer in candidates:
        try:
            asked = functools.partial(hello, transport, peer, run_id)  # again if the stream ended early
            names.learn(peer, with_retries(f"asking {network_peer(peer)} for run {run_id!r}", asked))
            return peer
        except TransportError as e:  # RunNotFound included: that peer serves another run
            problems.append(str(e))
    raise TransportError(problems[0] if len(problems) == 1 else "; ".join(problems))


def fetch_run(
    transport: Transport, peer: str, run_id: str, pinned: str | None, names: PeerNames | None = None
) -> tuple[RunConfig, str, str]:
    """The run's config (parsed, validated, signed by an authority matching `pinned` if given), its JSON
    text as served, and the signing authority's key (hex)."""
    names = names or PeerNames(run_id)
    text = with_retries("fetching the run config", lambda: fetch_run_config_json(transport, peer, run_id))
    run = RunConfig.from_json(text)
    if run.run_id != run_id:
        raise TransportError(f"{names(peer)} answered with the config of run {run.run_id!r}, not {run_id!r}")
    if not run.authorities:
        raise ConfigError(f"run {run_id!r} names no authority keys: nobody could seal its rounds")
    return run, text, run.verify(pinned)


def announce_trust(signer: str, pinned: str | None, source: str) -> None:
    """Say which authority was trusted; without a pin, plainly that it was on first use."""
    if pinned is None:
        print(
            f"trusting {source} on first use: the run's authority is {fingerprint(signer)}; check it "
            f"with the run's operator (pass --authority {fingerprint(signer)} to require it)",
            flush=True,
        )


def pinned_authority(flag: str | None, state: StateDir) -> str | None:
    """--authority, else the fingerprint stored at the first join; ConfigError if they disagree."""
    stored = state.pinned_authority()
    given = check_fingerprint(flag, "--authority") if flag else None
    if given and stored and not (given.startswith(stored) or stored.startswith(given)):
        raise ConfigError(
            f"--authority {given} differs from the authority {stored} this state dir joined with "
            f"({state.authority_file}): use another --state-dir for another run"
        )
    return given or stored


def genesis_weights(run: RunConfig) -> dict:
    """The run's round-0 weights: the model initialised from `train.seed`; ConfigError if they are not
    the ones the config's genesis hash records (another torch version may initialise differently)."""
    import torch

    torch.manual_seed(run.train.seed)
    model = NordLM(run.model)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    if run.genesis_hash and weights_hash(weights) != run.genesis_hash:
        raise ConfigError(
            f"this machine initialises run {run.run_id!r}'s model to weights {weights_hash(weights)[:16]}…, "
            f"not the genesis weights {run.genesis_hash[:16]}… its config records (another torch version?)"
        )
    return weights


def authorize_run(run: RunConfig, identity) -> RunConfig:
    """`run` with its genesis weights hash recorded (computed if `init` did not) and signed by
    `identity`, one of its authorities: what the coordinator and the bootstrap peer serve."""
    if not run.genesis_hash:
        run = dataclasses.replace(run, genesis_hash=weights_hash(genesis_weights(run)))
    return run.signed(identity)


def model_spec(run: RunConfig) -> dict[str, tuple[int, ...]]:
    """The trainable tensors peers exchange (built on the meta device: no memory, no init cost)."""
    import torch

    with torch.device("meta"):
        model = NordLM(run.model)
    return model.param_spec()


def open_replica(
    run: RunConfig, replica_dir: Path, *, transport: Transport, source: str, names: PeerNames | None = None
) -> Replica:
    """Resume the replica in `replica_dir`, or start one from `source`'s verified sealed snapshot."""
    if Store(replica_dir).exists:
        replica = Replica.open(replica_dir, **replica_settings(run))
        if replica.run_id != run.run_id:
            raise ConfigError(f"{replica_dir} holds a replica of run {replica.run_id!r}, not {run.run_id!r}")
        log.info("resumed replica at round %d from %s", replica.round, replica_dir)
        return replica
    names = names or PeerNames(run.run_id)
    replica = fetch_replica(run, transport, source, replica_dir, names)
    log.info("started replica at round %d from %s's snapshot", replica.round, names(source))
    return replica


def replica_settings(run: RunConfig) -> dict:
    return {
        "spec": model_spec(run),
        "merge": run.merge,
        "authorities": [bytes.fromhex(k) for k in run.authorities],
    }


def fetch_replica(
    run: RunConfig, transport: Transport, peer: str, replica_dir: Path, names: PeerNames | None = None
) -> Replica:
    """A new replica in `replica_dir` from `peer`'s snapshot, written only once the snapshot verified
    (genesis hash at round 0, else an authority seal covering weights and metadata); TransportError
    naming the peer otherwise, with nothing left in `replica_dir`."""
    names = names or PeerNames(run.run_id)
    with tempfile.TemporaryDirectory(prefix="nord-snapshot-") as tmp:
        out = Path(tmp) / "snapshot.safetensors"
        budget = snapshot_max_bytes(run.model)
        path = with_retries(
            "fetching the sealed snapshot",
            lambda: fetch_snapshot(transport, peer, run.run_id, out, max_bytes=budget),
        )
        try:
            tensors, meta = load_checkpoint(path)
        except CheckpointError as e:
            raise TransportError(f"{names(peer)} sent an unreadable snapshot: {e}") from None
    if meta.get("run_id") != run.run_id:
        raise TransportError(f"{names(peer)} sent a snapshot of another run")
    try:
        return Replica.from_snapshot(
            tensors, meta, **replica_settings(run), genesis_hash=run.genesis_hash, log_dir=replica_dir
        )
    except MergeError as e:
        raise TransportError(f"{names(peer)} sent an unusable snapshot: {e}") from None
