"""`nord-node bootstrap`: a minimal bootstrap peer and authority for one run (local runs and tests).

It creates the run (a RunConfig from a model recipe and a data source, its own key as the only
authority, initial weights from `train.seed`), serves the gossip protocol as a public peer, and seals
the open round once `--quorum` contributions are pooled, or `--deadline-s` after the round opened with
at least one. `nord-coordinator serve` is the full version (validation, checkpoints, dashboard); both
speak the same protocol, so workers cannot tell them apart.

Restarting with the same --state-dir resumes the run (same peer id, key, config and replica).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from node.session import authorize_run, genesis_weights, model_spec, start_transport
from node.state import StateDir
from nord.config import RoundConfig, RunConfig, TrainConfig
from nord.crdt import Replica, Seal
from nord.crdt.log import Store
from nord.data import Corpus, DataConfig, prepare
from nord.gossip import PEER_TTL_S, Gossip
from nord.identity import Identity
from nord.recipes import get_config
from nord.transport import Transport

log = logging.getLogger(__name__)

RECENT_SEALS = 16  # seals listed in status.json (the replica's log and snapshot hold the rest)
COMPACT_KEEP_ROUNDS = 1  # as the coordinator: the last sealed round stays unfolded (a rival seal may win)


def create_run(args, identity: Identity, data_root: Path | None) -> RunConfig:
    data = DataConfig(source=args.data_source, vocab_size=get_config(args.recipe).vocab_size)
    corpus = prepare(data, data_root, progress=True)
    run = RunConfig(
        run_id=args.run,
        model=get_config(args.recipe),
        data=dataclasses.replace(data, tokenizer_sha256=corpus.tokenizer_hash),
        train=TrainConfig(inner_steps=args.inner_steps, batch_size=args.batch_size, seq_len=args.seq_len),
        rounds=RoundConfig(quorum=args.quorum, deadline_s=args.deadline_s),
        authorities=(identity.public_hex,),
    )
    return authorize_run(run, identity)


def open_run_replica(run: RunConfig, state: StateDir) -> Replica:
    spec = model_spec(run)
    authorities = [bytes.fromhex(k) for k in run.authorities]
    if Store(state.replica_dir).exists:
        return Replica.open(state.replica_dir, spec=spec, merge=run.merge, authorities=authorities)
    base = genesis_weights(run)
    return Replica(
        run_id=run.run_id,
        spec=spec,
        base=base,
        merge=run.merge,
        authorities=authorities,
        log_dir=state.replica_dir,
    )


@contextlib.contextmanager
def serving_run(
    args, run: RunConfig, state: StateDir, corpus: Corpus, *, role: str
) -> Iterator[tuple[Transport, Replica, Gossip]]:
    """A public peer of `run`: its transport, its replica (resumed from `state`) served over gossip.

    Everything is closed on the way out; SIGINT/SIGTERM (the transport turns them into
    KeyboardInterrupt) end the block cleanly. The bootstrap peer and the coordinator both start this way.
    """
    transport = start_transport(args, state.p2p_key)
    transport.install_signal_handlers()
    replica = gossip = None
    try:
        replica = open_run_replica(run, state)
        gossip = Gossip(
            transport,
            replica,
            run.to_json(),
            role=role,
            tokenizer_path=Path(corpus.path) / "tokenizer.json",
            identity=Identity.load_or_create(state.identity_key),  # hellos prove which key this peer is
        )
        gossip.serve()
        yield transport, replica, gossip
    except KeyboardInterrupt:
        if transport.stopped_by_signal not in (signal.SIGTERM, signal.SIGINT):
            raise
    finally:
        if gossip is not None:
            gossip.close()
        transport.shutdown()
        if replica is not None:
            replica.close()


def bootstrap(args) -> int:
    state = StateDir(args.state_dir or Path.home() / ".nord" / f"{args.run}-bootstrap")
    data_root = Path(args.data_dir).expanduser() if args.data_dir else None
    identity = Identity.load_or_create(state.identity_key)
    run = (
        authorize_run(RunConfig.load(state.run_json), identity)
        if state.run_json.is_file()
        else create_run(args, identity, data_root)
    )
    state.check_run(run.to_json())
    corpus = prepare(run.data, data_root, progress=False)
    with serving_run(args, run, state, corpus, role="bootstrap") as (transport, replica, gossip):
        addresses = transport.visible_maddrs()
        state.path.joinpath("maddrs.txt").write_text("\n".join(addresses) + "\n")
        print(f"run {run.run_id}: bootstrap peer ready; workers join with", flush=True)
        for addr in addresses:
            print(f"  nord-node join --run {run.run_id} --initial-peers {addr}", flush=True)
        seal_loop(run, replica, gossip, identity, state)
    return 0


def seal_loop(run: RunConfig, replica: Replica, gossip: Gossip, identity: Identity, state: StateDir) -> None:
    """Seal rounds by quorum or deadline, forever (until SIGINT/SIGTERM)."""
    opened_round, opened_at, last_heartbeat, last_sync = -1, time.monotonic(), 0.0, 0.0
    recent: collections.deque[dict] = collections.deque(maxlen=RECENT_SEALS)
    while True:
        now = time.monotonic()
        with gossip.lock:
            rnd, pool = replica.round, replica.pool()
        if rnd != opened_round:
            opened_round, opened_at = rnd, now
        if len(pool) >= run.rounds.quorum or (pool and now - opened_at >= run.rounds.deadline_s):
            seal = seal_open_round(replica, identity, gossip.lock, state, recent)
            reached = gossip.publish_seal(seal)
            log.info(
                "sealed round %d with %d contribution(s); pushed to %d peer(s)",
                seal.round,
                len(seal.contribution_ids),
                reached,
            )
            print(
                f"sealed round {seal.round}: {len(seal.contribution_ids)} contribution(s), "
                f"weights {seal.weights_hash[:12]}",
                flush=True,
            )
        if now - last_heartbeat > PEER_TTL_S / 3:
            gossip.heartbeat()
            last_heartbeat = now
        if now - last_sync > 5.0:  # pick up what client-mode peers could only leave with others
            gossip.anti_entropy(fanout=1)
            last_sync = now
        time.sleep(0.2)


def seal_open_round(
    replica: Replica, identity: Identity, lock, state: StateDir, recent: collections.deque
) -> Seal:
    """Seal the open round, compact the replica (memory and state dir stay bounded however long the run),
    and list the seal in status.json among the `recent` ones."""
    with lock:
        seal = replica.seal(identity)
        held = dict(replica.contributions())
        authors = sorted(held[c].peer_key.hex() for c in seal.contribution_ids if c in held)
    replica.compact(keep_rounds=COMPACT_KEEP_ROUNDS, lock=lock)
    recent.append({"round": seal.round, "contributors": authors, "ids": list(seal.contribution_ids)})
    state.write_status(
        {"open_round": seal.round + 1, "sealed_weights_hash": seal.weights_hash, "seals": list(recent)}
    )
    return seal
