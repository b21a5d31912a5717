"""The run's authority: validates contributions, seals rounds, keeps checkpoints and the run's history.

One `step()` (called a few times a second by the server):

    record contributions the replica holds but the history does not (peer, bytes, tokens)
    remove (signed OR-Set removal, gossiped) those of banned or non-allowlisted peers, and every
        contribution of a peer that signed two for one round (equivocation: it counts toward a ban)
    score every pooled contribution not scored yet (coordinator.validate); remove rejected ones and ban
        a peer after `ban_after` rejections
    seal the open round once `quorum` accepted contributions are pooled, or `deadline_s` after it opened
        with at least one; then save the new weights as checkpoint round+1 (keeping the last
        `keep_checkpoints`), record seal + metrics in the history, gossip the seal, compact the replica

Locking. `lock` is the gossip lock: every peer's request handler needs it to read or change the replica.
The authority holds it only to copy a consistent view of the replica (its pool, a clone of the sealed
weights) and to apply a change to it (a seal, a removal, a compaction's commit); scoring, evaluation,
checkpoint writes, history bookkeeping and compaction's folding and writing run outside it. Seals and
removals are pushed to peers by a publisher thread, so a peer that takes a push and never answers
delays only its own copy (anti-entropy repairs it), never the next round.

Crash safety: the replica's log is the truth for contributions, removals and seals; the history catches
up from it on the next step (a seal on the replica's chain that the history lacks is recorded then), so a
`kill -9` at any point loses nothing. Round open times live in the history, so deadlines survive restarts.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.history import History
from coordinator.validate import ValidationConfig, Validator
from nord.checkpoint import save_checkpoint
from nord.checks import is_reason
from nord.config import RunConfig
from nord.crdt import Removal, Replica, Seal
from nord.errors import MergeError
from nord.protocol import seal_reason

log = logging.getLogger(__name__)

COMPACT_KEEP_ROUNDS = 1  # sealed rounds kept unfolded on the replica (a competing seal may still win)


class Publisher:
    """Pushes seals and removals to peers in order, from one daemon thread.

    A push waits for every reachable peer (up to the gossip's push timeout); done here, a stalled peer
    holds up only later pushes, not the authority's loop or the gossip lock.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def put(self, publish: Callable[[object], object], item: object) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nord-publish", daemon=True)
            self._thread.start()
        self._queue.put((publish, item))

    def _run(self) -> None:
        while (task := self._queue.get()) is not None:
            publish, item = task
            try:
                publish(item)
            except Exception:  # a failed push is repaired by anti-entropy; keep publishing the rest
                log.exception("publishing %s failed", type(item).__name__)

    def close(self, timeout_s: float = 5.0) -> None:
        """Publish what is queued (for at most `timeout_s`), then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout_s)


class Authority:
    """Sealing, validation and bookkeeping for one run. Thread-safe; `lock` is the gossip lock."""

    def __init__(
        self,
        *,
        run: RunConfig,
        replica: Replica,
        identity,
        history: History,
        validator: Validator,
        checkpoint_dir: Path,
        validation: ValidationConfig,
        lock: threading.RLock,
        publish_seal: Callable[[Seal], object] = lambda seal: None,
        publish_removal: Callable[[Removal], object] = lambda removal: None,
        allowlist: frozenset[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.run, self.replica, self.identity, self.history = run, replica, identity, history
        self.validator, self.validation, self.lock = validator, validation, lock
        self.checkpoint_dir = Path(checkpoint_dir)
        self.publish_seal, self.publish_removal = publish_seal, publish_removal
        self.allowlist, self.clock = allowlist, clock
        self.tokens_per_contribution = run.train.inner_steps * run.train.batch_size * run.train.seq_len
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.publisher = Publisher()
        self._observed: set[str] = set()  # held contribution ids this process has recorded and screened
        self._bookkeeping = threading.RLock()  # one writer of verdicts, seals and checkpoints at a time

    # ---- the loop body ----------------------------------------------------------------------------

    def start(self) -> None:
        """Save round 0's weights (or the replica's current base) as a checkpoint if none exists yet."""
        self._catch_up()
        with self.lock:
            rnd, base_hash, tip = self.replica.round, self.replica.base_hash, self.replica.tip_seal
            weights = self.replica.weights(include_open_round=False)
        if self.history.checkpoint(rnd) is None:
            self._save_checkpoint(rnd, weights, tip)
        self.history.open_round(rnd, base_hash=base_hash, at=self.clock())

    def step(self) -> Seal | None:
        """Observe, validate, and seal if the round is due; return the new seal, if any."""
        self._catch_up()
        self._observe()
        self._score()
        return self._maybe_seal()

    def close(self) -> None:
        """Finish publishing what is queued (bounded) and stop the publisher thread."""
        self.publisher.close()

    def _catch_up(self) -> None:
        """Record seals on the replica's chain that the history lacks (after a crash or a rival seal)."""
        with self.lock:
            chain = self.replica.seals()
        for seal in chain:
            known = self.history.round(seal.round)
            if known and known["weights_hash"] == seal.weights_hash:
                continue
            if not known:
                self.history.open_round(seal.round, base_hash=seal.prev_hash, at=self.clock())
            log.info("recording seal of round %d from the replica's log", seal.round)
            with self.lock:  # the weights a seal produced are at hand only while it is the tip
                tip = self.replica.tip_seal
                weights = (
                    self.replica.weights(include_open_round=False)
                    if tip is not None and tip.seal_id == seal.seal_id
                    else None
                )
            self._record_seal(seal, weights, reason="recovered")

    def _observe(self) -> None:
        """Record newly held contributions; remove those of banned, non-allowlisted or equivocating peers.

        Each held contribution is screened once per process (a restart screens the pending ones again).
        """
        with self.lock:
            held = self.replica.contributions()
        self._observed &= {cid for cid, _ in held}  # forget what the replica pruned or compacted
        now = self.clock()
        for cid, envelope in held:
            if cid in self._observed:
                continue
            self._observed.add(cid)
            peer = envelope.peer_key.hex()
            self.history.record_contribution(
                cid,
                round=int(envelope.round),
                peer=peer,
                nbytes=int(envelope.nbytes),
                tokens=self.tokens_per_contribution,
                at=now,
            )
            if (self.history.contribution(cid) or {}).get("status") != "pending":
                continue
            if self.history.is_banned(peer):
                self._reject(cid, "peer is banned", by="validator")
            elif self.allowlist is not None and peer not in self.allowlist:
                self._reject(cid, "peer is not on this run's allowlist", by="validator")
            else:
                self._screen_equivocation(peer, int(envelope.round))

    def _screen_equivocation(self, peer: str, rnd: int) -> None:
        """A peer that signed several contributions for one round loses every unsealed one of them (the
        OR-Set pools none of them anyway), and the equivocation counts toward its ban."""
        signed = [c for c in self.history.contributions(round=rnd) if c["peer"] == peer]
        if len(signed) < 2:
            return
        reason = f"equivocation: {len(signed)} different contributions signed for round {rnd}"
        for row in signed:
            if row["sealed_in"] is None and row["status"] in ("pending", "accepted"):
                with self._bookkeeping:
                    self.history.set_verdict(row["id"], "rejected", reason=reason)
                self._reject(row["id"], reason, by="validator")
        self._count_toward_ban(peer)

    def _score(self) -> None:
        """Score every pooled contribution not scored yet, outside the lock, on a copy of the base."""
        with self.lock:
            base_hash, pool = self.replica.base_hash, self.replica.pool()
        todo = [cid for cid in pool if (self.history.contribution(cid) or {}).get("status") == "pending"]
        if not todo:
            return
        with self.lock:
            if self.replica.base_hash != base_hash:
                return  # the round moved on: score again next step
            held = dict(self.replica.contributions())
            base = self.replica.weights(include_open_round=False)
        todo = [(cid, held[cid]) for cid in todo if cid in held]
        verdicts = [(cid, env, self.validator.score(env, base_hash, base)) for cid, env in todo]
        with self.lock:
            moved_on = self.replica.base_hash != base_hash
        if not moved_on:
            for cid, envelope, verdict in verdicts:
                self._apply_verdict(cid, envelope, verdict)

    def _apply_verdict(self, cid: str, envelope, verdict) -> None:
        with self._bookkeeping:
            if (self.history.contribution(cid) or {}).get("status") != "pending":
                return  # revoked or banned meanwhile
            self.history.set_verdict(
                cid,
                "accepted" if verdict.accepted else "rejected",
                reason=verdict.reason,
                loss_before=verdict.loss_before,
                loss_after=verdict.loss_after,
                norm=verdict.norm,
            )
        if not verdict.accepted:
            self._reject(cid, verdict.reason or "rejected", by="validator")
            self._count_toward_ban(envelope.peer_key.hex())

    def _count_toward_ban(self, peer: str) -> None:
        if self.history.rejections(peer) >= self.validation.ban_after and not self.history.is_banned(peer):
            self.ban(peer, reason=f"{self.validation.ban_after} contributions rejected", by="validator")

    def _maybe_seal(self) -> Seal | None:
        with self.lock:
            rnd, base_hash, pool = self.replica.round, self.replica.base_hash, self.replica.pool()
        self.history.open_round(rnd, base_hash=base_hash, at=self.clock())
        accepted = [c for c in pool if (self.history.contribution(c) or {}).get("status") == "accepted"]
        opened_at = self.history.current_round()["opened_at"]
        reason = seal_reason(  # None while something is unscored (arrived since) or nothing to seal
            pooled=len(pool),
            all_accepted=len(accepted) == len(pool),
            age_s=self.clock() - opened_at,
            quorum=self.run.rounds.quorum,
            deadline_s=self.run.rounds.deadline_s,
        )
        if reason is None:
            return None
        with self.lock:
            if (self.replica.round, self.replica.pool()) != (rnd, pool):
                return None  # a contribution arrived or went meanwhile: it is scored first
            seal = self.replica.seal(self.identity)
            weights = self.replica.weights(include_open_round=False)
        self._record_seal(seal, weights, reason=reason)
        self.publisher.put(self.publish_seal, seal)
        self.replica.compact(keep_rounds=COMPACT_KEEP_ROUNDS, lock=self.lock)  # the lock only to copy, commit
        log.info(
            "sealed round %d (%s): %d contribution(s), weights %s",
            seal.round,
            reason,
            len(seal.contribution_ids),
            seal.weights_hash[:12],
        )
        return seal

    def _record_seal(self, seal: Seal, weights, *, reason: str) -> None:
        """Checkpoint `weights` (what `seal` produced: round + 1, None if no longer at hand), measure them,
        and record it all."""
        metrics: dict[str, float] = {}
        if weights is not None:
            if self.history.checkpoint(seal.round + 1) is None:
                self._save_checkpoint(seal.round + 1, weights, seal)
            evaluation = self.validator.evaluate(weights)
            metrics = {"val_loss": evaluation.loss, "val_ppl": math.exp(min(evaluation.loss, 50.0))}
            metrics |= {f"firing_rate/{k}": v for k, v in evaluation.rates.items() if k != "overall"}
            metrics["firing_rate_mean"] = evaluation.rates.get("overall", math.nan)
        metrics["contributors"] = len(seal.contribution_ids)
        with self._bookkeeping:
            self.history.seal_round(
                seal.round, weights_hash=seal.weights_hash, reason=reason, metrics=metrics, at=self.clock()
            )
            self.history.mark_sealed(list(seal.contribution_ids), seal.round)
            self.history.open_round(seal.round + 1, base_hash=seal.weights_hash, at=self.clock())

    def _save_checkpoint(self, rnd: int, weights, seal: Seal | None) -> None:
        """Checkpoint `rnd` carries the seal that produced it, so the two are served and removed together
        (the replica's compaction may drop the seal itself while the checkpoint is still offered)."""
        name = f"{rnd}.safetensors"
        path = self.checkpoint_dir / name
        meta = {"run_id": self.run.run_id, "round": rnd, "model_config": self.run.to_dict()["model"]}
        if seal is not None and seal.round == rnd - 1:
            meta["seal"] = seal.to_bytes().hex()
        digest = save_checkpoint(path, weights, meta)
        self.history.record_checkpoint(
            rnd, file=name, weights_hash=digest, nbytes=path.stat().st_size, at=self.clock()
        )
        kept = self.history.checkpoints()
        for old in kept[: max(0, len(kept) - self.run.rounds.keep_checkpoints)]:
            (self.checkpoint_dir / old["file"]).unlink(missing_ok=True)
            self.history.mark_checkpoint_deleted(old["round"])

    # ---- removals and bans (validator and admin) --------------------------------------------------

    def _reject(self, cid: str, reason: str, *, by: str) -> None:
        try:
            with self.lock:
                removal = self.replica.remove(cid, reason=reason, identity=self.identity)
        except MergeError as e:
            log.warning("could not remove %s: %s", cid[:16], e)
            return
        with self._bookkeeping:
            self.history.record_revocation(cid, reason=reason, by=by, at=self.clock())
        self.publisher.put(self.publish_removal, removal)
        log.info("removed contribution %s: %s", cid[:16], reason)

    def revoke(self, contribution_id: str, *, reason: str, by: str) -> None:
        """Remove a contribution from the set (signed by this authority) and record why."""
        with self.lock:  # held throughout (rare, admin): the round must not be sealed in between
            held = dict(self.replica.contributions())
            sealed = any(contribution_id in s.contribution_ids for s in self.replica.seals())
            if contribution_id not in held or sealed:
                raise MergeError(
                    f"contribution {contribution_id[:16]} is already sealed into a round (or unknown here); "
                    "only contributions of the open round can be revoked"
                )
            self._reject(contribution_id, reason, by=by)

    def ban(self, peer: str, *, reason: str, by: str) -> None:
        """Ban `peer`: its pending contributions are removed and its future ones rejected on arrival."""
        self.history.ban(peer, reason=reason, by=by, at=self.clock())
        with self.lock:
            pooled = set(self.replica.pool())
            theirs = [cid for cid, e in self.replica.contributions() if e.peer_key.hex() == peer]
        removal_reason = f"peer banned: {reason}"
        if not is_reason(removal_reason):  # the signed removal takes at most MAX_REASON_CHARS
            removal_reason = "peer banned (the full reason is in /api/revocations)"
        for cid in theirs:
            if cid in pooled:
                self._reject(cid, removal_reason, by=by)
