"""`nord-node join`: the volunteer worker's loop.

    fetch the run's config and latest sealed snapshot → prepare the data, take a shard
    loop:  W ← sealed weights of the open round r
           H inner steps (nord.train.train_steps) on the shard
           Δ ← W_local − W; envelope ← DeltaEncoder.encode(Δ) (error feedback keeps what was not sent)
           save state → add to the replica → announce in the DHT and push to reachable peers
           anti-entropy until an authority's seal for round r arrives, then round r + 1

A restart with the same --state-dir resumes: same peer id, same signing key, the replica from its log,
the residual and optimizer state, and, if round r was already contributed, that same envelope (never a
second one: two envelopes of one peer and round would both be excluded as equivocation).

Falling behind: a peer's `behind` flag is a claim, checked before anything is replaced (node.catchup).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from node.catchup import CatchUp
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
from nord.checks import fingerprint
from nord.codec import DeltaEncoder, decode_envelope
from nord.config import RunConfig
from nord.crdt import Replica
from nord.data import prepare
from nord.errors import CodecError, ConfigError, MergeError, NordError, TransportError
from nord.gossip import PEER_TTL_S, Gossip
from nord.identity import Identity
from nord.memory import device_memory_bytes
from nord.model import NordLM, resolve_device
from nord.shards import (
    ShardPlan,
    contribution_delta,
    freeze_outside,
    parse_shards,
    plan_for,
    plan_shards,
    round_coverage,
    trained_names,
    worker_sizing,
)
from nord.train import make_optimizer, train_steps
from nord.transport import Transport

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 8  # shard count when --shard is not given: worker i = hash(peer id) mod 8


class OutOfMemory(NordError):
    """The run's model and batch do not fit this device."""


@dataclasses.dataclass
class RoundReport:
    round: int
    loss: float | None
    firing_rate: float | None
    contributed: bool


class Worker:
    """One worker bound to a started transport, a replica and a prepared corpus."""

    def __init__(
        self,
        *,
        run: RunConfig,
        run_json: str,
        transport: Transport,
        replica: Replica,
        state: StateDir,
        identity: Identity,
        corpus,
        shard: tuple[int, int],
        device: torch.device,
        bootstrap: tuple[str, ...],
        poll_s: float = 1.0,
        progress: bool = True,
        compact_every: int = 8,
        param_shards: str | None = None,
        name: str | None = None,
    ) -> None:
        self.run, self.transport, self.replica, self.state = run, transport, replica, state
        self.identity, self.corpus, self.shard, self.device = identity, corpus, shard, device
        self.poll_s, self.progress, self.compact_every = poll_s, progress, compact_every
        self.spec = model_spec(run)
        self.plan = self._plan_shards(param_shards)
        self.trained = trained_names(self.spec, run.model, run.shards, self.plan.shards)
        self.gossip = Gossip(
            transport,
            replica,
            run_json,
            role="worker",
            bootstrap_peers=bootstrap,
            tokenizer_path=Path(corpus.path) / "tokenizer.json",
            presence={
                "key": identity.public_hex,
                **({"name": name} if name else {}),
                "device": describe_device(device),
                "shards": list(self.plan.shards),
            },
        )
        self.model = NordLM(run.model, activation_checkpointing=self.plan.activation_checkpointing).to(device)
        freeze_outside(self.model, self.trained)  # no gradients, no optimizer state outside our shards
        self.optimizer = make_optimizer(self.model, run.train, device, eight_bit=device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.encoder = DeltaEncoder(run.codec, self.spec)
        self.inner_steps_done = 0
        self.resumed_round: int | None = None  # open round whose saved contribution _restore re-sent
        self._last_heartbeat = 0.0
        self.catch_up = CatchUp(run, transport, state)
        self._restore()
        seed_material = hashlib.sha256(f"{run.train.seed}:{transport.peer_id}".encode()).digest()
        seed = (int.from_bytes(seed_material[:4], "big") + self.inner_steps_done) % 2**32
        self.batches = corpus.batches(
            "train", run.train.batch_size, run.train.seq_len, seed=seed, shard=shard
        )

    # ---- state -------------------------------------------------------------------------------------

    def _plan_shards(self, override: str | None) -> ShardPlan:
        """--shards, else the shards of a previous session (its optimizer state is theirs), else the
        largest set of the open round's least-covered shards that fits this device's memory."""
        run, budget = self.run, device_memory_bytes(self.device)
        sizing = worker_sizing(run.train.batch_size, run.train.seq_len, self.device)
        saved = self.state.load_worker() or {}
        chosen = parse_shards(override, run.shards) if override else tuple(saved.get("shards") or ())
        if chosen:
            plan = plan_for(run.model, run.shards, chosen, budget_bytes=budget, **sizing)
        else:
            try:
                presence = self.transport.get_records(f"nord/{run.run_id}/peers")
            except TransportError:
                presence = {}
            mine = self.replica.contributions(self.replica.round)
            counts = round_coverage(
                run.model, run.shards, presence=presence, me=self.transport.peer_id,
                contributions=[(e.peer_key.hex(), e.names) for _, e in mine],
            )  # fmt: skip
            plan = plan_shards(
                run.model, run.shards, counts, budget_bytes=budget, tie_break=self.transport.peer_id, **sizing
            )
        log.info("%s", plan.describe(budget))
        return plan

    def _restore(self) -> None:
        saved = self.state.load_worker()
        if saved is None:
            return
        try:
            self.encoder.load_state_dict(saved["residual"])
            if saved.get("optimizer"):
                self.optimizer.load_state_dict(saved["optimizer"])
        except (CodecError, ValueError, KeyError) as e:
            raise ConfigError(f"{self.state.worker_file} does not fit this run ({e}); delete it") from None
        self.inner_steps_done = int(saved.get("inner_steps_done", 0))
        pending = saved.get("envelope")  # our last envelope, saved before it was added or sent
        if pending:
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
        self.state.save_worker(
            {
                "residual": self.encoder.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "inner_steps_done": self.inner_steps_done,
                "envelope": envelope_bytes or b"",
                "shards": list(self.plan.shards),
            }
        )

    # ---- the loop ----------------------------------------------------------------------------------

    def run_rounds(self, max_rounds: int | None) -> None:
        self.gossip.serve()
        done = 0
        bar = tqdm(total=max_rounds, desc="rounds", unit="round", disable=not self.progress)
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
            self.gossip.close()

    def _compact_if_due(self) -> None:
        """Fold old sealed rounds into the replica's base snapshot so memory and disk stay bounded."""
        with self.gossip.lock:
            if len(self.replica.seals()) > self.compact_every:
                self.replica.compact(keep_rounds=1)
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
        self.model.load_state_dict({k: v.to(self.device) for k, v in base.items()}, strict=True)
        stats = self._train()
        delta = contribution_delta(self.model, base, self.trained)  # our shards' tensors only
        envelope = self.encoder.encode(
            delta, run_id=self.run.run_id, round=rnd, base_hash=base_hash, identity=self.identity
        )
        self._save(envelope.to_bytes())
        self._add_and_publish(envelope, resend=False)
        return RoundReport(round=rnd, loss=stats.loss, firing_rate=stats.firing_rate, contributed=True)

    def _train(self):
        cfg = self.run.train

        def lr_at(step: int) -> float:
            return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))

        try:
            stats = train_steps(
                self.model,
                self.optimizer,
                self.batches,
                cfg.inner_steps,
                scaler=self.scaler,
                grad_clip=cfg.grad_clip,
                lr_fn=lr_at,
                start_step=self.inner_steps_done,
                device=self.device,
                progress=self.progress,
            )
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(self._oom_message()) from None
        self.inner_steps_done += cfg.inner_steps
        return stats

    def _oom_message(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (
            f"out of GPU memory: this run's model ({params:.0f}M parameters, "
            f"batch {self.run.train.batch_size}×{self.run.train.seq_len}) does not fit {props.name} "
            f"({props.total_memory / 2**30:.1f} GiB); "
            "join a run with a smaller recipe, free the GPU, or use --device cpu"
        )

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
        """What the authority did with our contribution to sealed round `rnd`: its seal lists it
        (accepted), a signed removal gives the validator's reason (rejected), or neither (yet)."""
        me = self.identity.public_key
        with self.gossip.lock:
            mine = [cid for cid, e in self.replica.contributions(round=rnd) if e.peer_key == me]
            seal = next((s for s in self.replica.seals() if s.round == rnd), None)
            reasons = {r.contribution_id: r.reason for r in self.replica.removals()}
        return contribution_verdict(mine, seal.contribution_ids if seal else None, reasons)

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
            time.sleep(self.poll_s)

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
            "shards": list(self.plan.shards),
            "bytes_up": self.transport.bytes_sent,
            "bytes_down": self.transport.bytes_received,
        }

    def _report(self, report: RoundReport, verdict: str) -> None:
        peers = len(self.gossip.peers())
        status = {
            **self._status(report.round),
            "phase": "sealed",
            "loss": report.loss,
            "firing_rate": report.firing_rate,
            "peers": peers,
        }
        self.state.write_status(status)
        loss = f"{report.loss:.3f}" if report.loss is not None else "  -  "
        rate = f"{report.firing_rate:.3f}" if report.firing_rate is not None else "  -  "
        tqdm.write(
            f"round {report.round} | {verdict} | loss {loss} | firing rate {rate} | peers {peers} | "
            f"up {_mb(status['bytes_up'])} down {_mb(status['bytes_down'])} | "
            f"weights {status['sealed_weights_hash'][:12]}"
        )


def contribution_verdict(mine: list[str], sealed: tuple[str, ...] | None, reasons: dict[str, str]) -> str:
    """One line on our contributions `mine` to a round: accepted if its seal (`sealed`: the ids it folded;
    None when the seal is not held) lists one, rejected with the removal's reason, else still undecided."""
    if not mine:
        return "no contribution from this peer"
    if sealed is not None and any(cid in sealed for cid in mine):
        return "contribution accepted"
    rejected = [reasons[cid] for cid in mine if cid in reasons]
    if rejected:
        return f"contribution rejected: {rejected[0]}"
    if sealed is None:
        return "contribution pending (the round's seal is not held here)"
    return "contribution not in the seal (no reason received yet: it may have arrived late)"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def shard_for(peer_id: str, override: str | None) -> tuple[int, int]:
    """`--shard i/n`, else shard hash(peer id) mod DEFAULT_SHARDS of DEFAULT_SHARDS."""
    if override:
        try:
            i, n = (int(x) for x in override.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {override!r}: write i/n, e.g. 2/8") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {override!r}: need 0 <= i < n")
        return i, n
    digest = hashlib.sha256(peer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % DEFAULT_SHARDS, DEFAULT_SHARDS


def join(args) -> int:
    """`nord-node join`: everything from flags to the training loop, with a clean shutdown on any exit."""
    state = StateDir(args.state_dir or Path.home() / ".nord" / args.run)
    pinned = pinned_authority(args.authority, state)
    device = resolve_device(args.device)
    state.recover_replica()
    transport = start_transport(args, state.p2p_key)
    transport.install_signal_handlers()
    replica = None
    try:
        source = find_run(transport, peer_ids(tuple(args.initial_peers)), args.run)
        run, run_json, signer = fetch_run(transport, source, args.run, pinned)
        announce_trust(signer, pinned, f"peer {source[-8:]}")
        state.check_run(run_json)
        state.pin_authority(pinned or fingerprint(signer))
        identity = Identity.load_or_create(state.identity_key)
        corpus = prepare(run.data, Path(args.data_dir).expanduser() if args.data_dir else None, progress=True)
        if corpus.vocab_size > run.model.vocab_size:
            raise ConfigError(
                f"the prepared tokenizer has {corpus.vocab_size} tokens, "
                f"more than the model's {run.model.vocab_size}"
            )
        replica = open_replica(run, state.replica_dir, transport=transport, source=source)
        worker = Worker(
            run=run,
            run_json=run_json,
            transport=transport,
            replica=replica,
            state=state,
            identity=identity,
            corpus=corpus,
            shard=shard_for(transport.peer_id, args.shard),
            device=device,
            bootstrap=peer_ids(tuple(args.initial_peers)),
            poll_s=args.poll_s,
            progress=not args.no_progress,
            compact_every=args.compact_every,
            param_shards=getattr(args, "shards", None),
            name=getattr(args, "name", None),
        )
        named = f" ({args.name})" if getattr(args, "name", None) else ""
        tqdm.write(
            f"joined run {run.run_id} as peer {identity.fingerprint}{named} "
            f"(data shard {worker.shard[0]}/{worker.shard[1]}, {device}); the dashboard lists you by that id"
        )
        worker.run_rounds(args.max_rounds)
        replica = worker.replica
        return 0
    except KeyboardInterrupt:
        if transport.stopped_by_signal in (signal.SIGTERM, signal.SIGINT):
            tqdm.write("stopped; run the same command again to resume")
            return 0  # asked to stop, and stopped cleanly
        raise
    finally:
        if replica is not None:
            replica.close()
        transport.shutdown()
