"""`nord-node join`: the volunteer worker's loop.

    fetch the run's config and latest sealed snapshot → prepare the data, take a shard
    loop:  train on the open round's sealed weights, envelope of the delta (node.trainer)
           save state → add to the replica → announce in the DHT and push to reachable peers
           anti-entropy until an authority's seal for round r arrives, then round r + 1

`Worker(options)` only checks and keeps its options; `start()` does the I/O (state dir, transport and
DHT, the run's config, identity, corpus, replica), `run_rounds()` the loop and `close()` the cleanup.

A restart with the same --state-dir resumes: same peer id, same signing key, the replica from its log,
the residual and optimizer state, and, if round r was already contributed, that same envelope (never a
second one: two envelopes of one peer and round would both be excluded as equivocation).

Falling behind: a peer's `behind` flag is a claim, checked before anything is replaced (node.catchup).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from tqdm import tqdm

from node.catchup import CatchUp
from node.peers import PeerNames
from node.report import RoundReport, describe_device, replica_verdict, round_line
from node.session import (
    announce_trust,
    fetch_run,
    find_run,
    model_spec,
    open_replica,
    peer_ids,
    pinned_authority,
    start_transport,
)
from node.state import StateDir
from node.trainer import LocalTrainer, choose_plan
from node.worker_options import WorkerOptions, shard_for
from nord.checks import fingerprint
from nord.codec import decode_envelope
from nord.data import prepare
from nord.errors import CodecError, ConfigError, MergeError, TransportError
from nord.gossip import PEER_TTL_S, Gossip
from nord.identity import Identity
from nord.model import resolve_device
from nord.shards import round_coverage

log = logging.getLogger(__name__)


class Worker:
    """One volunteer worker: `start()` joins the run, `run_rounds()` trains, `close()` lets go."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.bootstrap = peer_ids(options.initial_peers)
        self.state: StateDir | None = None
        self.transport = self.replica = self.gossip = self.trainer = None
        self.names = PeerNames(options.run_id)  # how logs name other peers (node.peers)
        self.resumed_round: int | None = None  # open round whose saved contribution start() re-sent
        self._last_heartbeat = 0.0

    # ---- joining -----------------------------------------------------------------------------------

    def start(self) -> Worker:
        """Open the state dir, start the peer, fetch and check the run, open the replica, resume."""
        o = self.options
        self.state = state = StateDir(o.state_dir)
        pinned = pinned_authority(o.authority, state)
        self.device = resolve_device(o.device)
        state.recover_replica()
        self.transport = transport = start_transport(o, state.p2p_key)
        transport.install_signal_handlers()
        source = find_run(transport, self.bootstrap, o.run_id, self.names)
        self.run, run_json, signer = fetch_run(transport, source, o.run_id, pinned, self.names)
        announce_trust(signer, pinned, self.names(source))
        state.check_run(run_json)
        state.pin_authority(pinned or fingerprint(signer))
        self.identity = Identity.load_or_create(state.identity_key)
        corpus = prepare(self.run.data, o.data_dir, progress=True)
        if corpus.vocab_size > self.run.model.vocab_size:
            raise ConfigError(
                f"the prepared tokenizer has {corpus.vocab_size} tokens, "
                f"more than the model's {self.run.model.vocab_size}"
            )
        self.replica = open_replica(
            self.run, state.replica_dir, transport=transport, source=source, names=self.names
        )
        self.shard = shard_for(transport.peer_id, o.shard)
        self.spec = model_spec(self.run)
        saved = state.load_worker()
        plan = choose_plan(
            self.run,
            self.device,
            override=o.param_shards,
            saved_shards=(saved or {}).get("shards"),
            coverage=self._coverage,
            tie_break=transport.peer_id,
        )
        self.gossip = Gossip(
            transport,
            self.replica,
            run_json,
            role="worker",
            bootstrap_peers=self.bootstrap,
            tokenizer_path=Path(corpus.path) / "tokenizer.json",
            identity=self.identity,
            adopt=o.adopt,
            presence={
                "key": self.identity.public_hex,
                **({"name": o.name} if o.name else {}),
                "device": describe_device(self.device),
                "shards": list(plan.shards),
            },
        )
        self.catch_up = CatchUp(self.run, transport, state, self.names)
        self.trainer = LocalTrainer(
            self.run,
            self.spec,
            plan,
            self.device,
            corpus=corpus,
            data_shard=self.shard,
            seed_key=transport.peer_id,
            saved=saved,
            saved_from=str(state.worker_file),
            progress=o.progress,
        )
        self._resend_saved((saved or {}).get("envelope"))
        return self

    def _coverage(self) -> dict[int, int]:
        """How many peers cover each parameter shard of the open round (presence records, contributions)."""
        try:
            presence = self.transport.get_records(f"nord/{self.run.run_id}/peers")
        except TransportError:
            presence = {}
        mine = self.replica.contributions(self.replica.round)
        return round_coverage(
            self.run.model, self.run.shards, presence=presence, me=self.transport.peer_id,
            contributions=[(e.peer_key.hex(), e.names) for _, e in mine],
        )  # fmt: skip

    def _resend_saved(self, pending: bytes | None) -> None:
        """Our last envelope, saved before it was added or sent: added and sent again (never retrained)."""
        if not pending:
            return
        try:
            envelope = decode_envelope(pending, self.spec, run_id=self.run.run_id)
        except CodecError as e:
            log.warning("dropping the saved contribution: %s", e)
            return
        self._add_and_publish(envelope, resend=True)
        with self.gossip.lock:
            if self.replica.round == envelope.round:
                self.resumed_round = envelope.round

    def _save(self, envelope_bytes: bytes | None) -> None:
        self.state.save_worker({**self.trainer.state_dict(), "envelope": envelope_bytes or b""})

    def close(self) -> None:
        """Stop serving, close the replica, shut the peer down (whatever `start()` got to)."""
        if self.gossip is not None:
            self.gossip.close()
        if self.replica is not None:
            self.replica.close()
        if self.transport is not None:
            self.transport.shutdown()

    def stopped_by_signal(self) -> bool:
        stopped = self.transport.stopped_by_signal if self.transport is not None else None
        return stopped in (signal.SIGTERM, signal.SIGINT)

    # ---- the loop ----------------------------------------------------------------------------------

    def run_rounds(self, max_rounds: int | None) -> None:
        self.gossip.serve()
        done = 0
        bar = tqdm(total=max_rounds, desc="rounds", unit="round", disable=not self.options.progress)
        try:
            if self.resumed_round is not None and max_rounds != 0:
                # The round interrupted after its contribution was saved is finished by this run: it
                # counts toward --max-rounds whether its seal comes before or after we are back.
                self.wait_for_seal(self.resumed_round)
                tqdm.write(f"round {self.resumed_round} | {self.verdict(self.resumed_round)}")
                done += 1
                bar.update(1)
            while max_rounds is None or done < max_rounds:
                self._catch_up()
                report = self.contribute()
                self.wait_for_seal(report.round)
                verdict = self.verdict(report.round)  # before compaction folds the round's seal away
                self._compact_if_due()
                done += 1
                bar.update(1)
                self._report(report, verdict)
        finally:
            bar.close()

    def _compact_if_due(self) -> None:
        """Fold old sealed rounds into the replica's base snapshot so memory and disk stay bounded."""
        with self.gossip.lock:
            due = self.replica.rounds_since_snapshot() > self.options.compact_every
        if due and self.replica.compact(keep_rounds=1, lock=self.gossip.lock):  # folds outside the lock
            log.info("compacted the replica: base round %d", self.replica.base_round)

    def contribute(self) -> RoundReport:
        """Train H steps on the open round's sealed weights and send the delta (once per round)."""
        with self.gossip.lock:
            rnd = self.replica.round
            if self._contributed(rnd):
                return RoundReport(round=rnd, loss=None, firing_rate=None, contributed=False)
            base = self.replica.weights(include_open_round=False)
            base_hash = self.replica.base_hash
        self.state.write_status({**self._status(rnd), "phase": "training"})
        trainer = self.trainer
        envelope, stats = trainer.contribution(base, rnd=rnd, base_hash=base_hash, identity=self.identity)
        self._save(envelope.to_bytes())
        self._add_and_publish(envelope, resend=False)
        return RoundReport(round=rnd, loss=stats.loss, firing_rate=stats.firing_rate, contributed=True)

    def _add_and_publish(self, envelope, *, resend: bool) -> None:
        with self.gossip.lock:
            try:
                self.replica.add(envelope)
            except MergeError as e:  # e.g. too old after a long outage: nothing to send
                log.warning("our contribution for round %d no longer applies: %s", envelope.round, e)
                return
        reached = self.gossip.publish(envelope)
        log.info(
            "%s contribution %s for round %d (%d bytes) to %d peer(s)",
            "re-sent" if resend else "sent",
            envelope.contribution_id[:12],
            envelope.round,
            envelope.nbytes,
            reached,
        )

    def verdict(self, rnd: int) -> str:
        """What the authority did with our contribution to sealed round `rnd` (node.report)."""
        with self.gossip.lock:
            return replica_verdict(self.replica, self.identity.public_key, rnd)

    def _contributed(self, rnd: int) -> bool:
        me = self.identity.public_key
        return any(e.peer_key == me for _, e in self.replica.contributions(round=rnd))

    def wait_for_seal(self, rnd: int) -> None:
        """Anti-entropy until the replica's open round moves past `rnd`."""
        self.state.write_status({**self._status(rnd), "phase": "waiting"})
        started = time.monotonic()
        warned = False
        while True:
            with self.gossip.lock:
                if self.replica.round > rnd:
                    return
            self._catch_up()
            if not warned and time.monotonic() - started > 2 * self.run.rounds.deadline_s + 60:
                log.warning(
                    "no seal for round %d after %.0f s: is the run's authority online?",
                    rnd,
                    time.monotonic() - started,
                )
                warned = True
            time.sleep(self.options.poll_s)

    def _catch_up(self) -> None:
        """One anti-entropy pass; if a peer says we lag its compaction point, look for a newer verified
        state (node.catchup), at most once per backoff period."""
        if time.monotonic() - self._last_heartbeat > PEER_TTL_S / 3:
            self.gossip.heartbeat()
            self._last_heartbeat = time.monotonic()
        _, behind = self.gossip.anti_entropy(fanout=2)
        if behind and self.catch_up.due():
            with self.gossip.lock:
                mine = self.replica.round
            staged = self.catch_up.fetch_newer(self.gossip, mine)
            if staged is not None:
                with self.gossip.lock:
                    self.replica = self.gossip.replica = self.catch_up.swap_in(self.replica, staged)

    # ---- reporting ---------------------------------------------------------------------------------

    def _status(self, rnd: int) -> dict:
        with self.gossip.lock:
            sealed_hash = self.replica.base_hash
            open_round = self.replica.round
        return {
            "round": rnd,
            "open_round": open_round,
            "sealed_weights_hash": sealed_hash,
            "peer_id": self.transport.peer_id,
            "shard": list(self.shard),
            "shards": list(self.trainer.plan.shards),
            "bytes_up": self.transport.bytes_sent,
            "bytes_down": self.transport.bytes_received,
        }

    def _report(self, report: RoundReport, verdict: str) -> None:
        status = {
            **self._status(report.round),
            "phase": "sealed",
            "loss": report.loss,
            "firing_rate": report.firing_rate,
            "peers": len(self.gossip.peers()),
        }
        self.state.write_status(status)
        tqdm.write(round_line(report, verdict, status))


def join(args) -> int:
    """`nord-node join`: everything from flags to the training loop, with a clean shutdown on any exit."""
    worker = Worker(WorkerOptions.from_args(args))
    try:
        worker.start()
        named = f" ({worker.options.name})" if worker.options.name else ""
        tqdm.write(
            f"joined run {worker.run.run_id} as peer {worker.identity.fingerprint}{named}: the dashboard "
            f"lists you by that id (data shard {worker.shard[0]}/{worker.shard[1]}, {worker.device}, "
            f"network id {worker.transport.peer_id})"
        )
        worker.run_rounds(args.max_rounds)
        return 0
    except KeyboardInterrupt:
        if worker.stopped_by_signal():
            tqdm.write("stopped; run the same command again to resume")
            return 0  # asked to stop, and stopped cleanly
        raise
    finally:
        worker.close()
