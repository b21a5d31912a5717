"""The run's authority: validates contributions, seals rounds, keeps checkpoints and the run's history.

One `step()` (called a few times a second by the server):

    record contributions the replica holds but the history does not (peer, bytes, tokens)
    remove (signed OR-Set removal, gossiped) those of banned or non-allowlisted peers
    score every pooled contribution not scored yet (coordinator.validate); remove rejected ones and ban
        a peer after `ban_after` rejections
    seal the open round once `quorum` accepted contributions are pooled, or `deadline_s` after it opened
        with at least one; then save the new weights as checkpoint round+1 (keeping the last
        `keep_checkpoints`), record seal + metrics in the history, gossip the seal, compact the replica

Crash safety: the replica's log is the truth for contributions, removals and seals; the history catches
up from it on the next step (a seal on the replica's chain that the history lacks is recorded then), so a
`kill -9` at any point loses nothing. Round open times live in the history, so deadlines survive restarts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.history import History
from coordinator.validate import ValidationConfig, Validator
from nord.checkpoint import save_checkpoint
from nord.config import RunConfig
from nord.crdt import Removal, Replica, Seal
from nord.errors import MergeError

log = logging.getLogger(__name__)

COMPACT_KEEP_ROUNDS = 1  # sealed rounds kept unfolded on the replica (a competing seal may still win)


class Authority:
    """Sealing, validation and bookkeeping for one run. Thread-safe through `lock` (the gossip lock)."""

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

    # ---- the loop body ----------------------------------------------------------------------------

    def start(self) -> None:
        """Save round 0's weights (or the replica's current base) as a checkpoint if none exists yet."""
        with self.lock:
            self._catch_up()
            rnd, base_hash = self.replica.round, self.replica.base_hash
            if self.history.checkpoint(rnd) is None:
                weights = self.replica.weights(include_open_round=False)
                self._save_checkpoint(rnd, weights, self.replica.tip_seal)
            self.history.open_round(rnd, base_hash=base_hash, at=self.clock())

    def step(self) -> Seal | None:
        """Observe, validate, and seal if the round is due; return the new seal, if any.

        Scoring runs outside the lock, so peers' gossip requests are not held up by forward passes.
        """
        with self.lock:
            self._catch_up()
            self._observe()
            base_hash = self.replica.base_hash
            held = dict(self.replica.contributions())
            todo = [
                (cid, held[cid])
                for cid in self.replica.pool()
                if (self.history.contribution(cid) or {}).get("status") == "pending"
            ]
            base = self.replica.weights(include_open_round=False) if todo else None
        verdicts = [(cid, env, self.validator.score(env, base_hash, base)) for cid, env in todo]
        with self.lock:
            if self.replica.base_hash == base_hash:  # else the round moved on: score again next step
                for cid, envelope, verdict in verdicts:
                    self._apply_verdict(cid, envelope, verdict)
            return self._maybe_seal()

    def _catch_up(self) -> None:
        """Record seals on the replica's chain that the history lacks (after a crash or a rival seal)."""
        for seal in self.replica.seals():
            known = [r for r in self.history.rounds() if r["round"] == seal.round]
            if known and known[0]["weights_hash"] == seal.weights_hash:
                continue
            if not known:
                self.history.open_round(seal.round, base_hash=seal.prev_hash, at=self.clock())
            log.info("recording seal of round %d from the replica's log", seal.round)
            self._record_seal(seal, reason="recovered")

    def _observe(self) -> None:
        now = self.clock()
        for cid, envelope in self.replica.contributions():
            if not self.history.record_contribution(
                cid,
                round=int(envelope.round),
                peer=envelope.peer_key.hex(),
                nbytes=int(envelope.nbytes),
                tokens=self.tokens_per_contribution,
                at=now,
            ):
                continue
            peer = envelope.peer_key.hex()
            if self.history.is_banned(peer):
                self._reject(cid, "peer is banned", by="validator")
            elif self.allowlist is not None and peer not in self.allowlist:
                self._reject(cid, "peer is not on this run's allowlist", by="validator")

    def _apply_verdict(self, cid: str, envelope, verdict) -> None:
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
        peer = envelope.peer_key.hex()
        if self.history.rejections(peer) >= self.validation.ban_after and not self.history.is_banned(peer):
            self.ban(peer, reason=f"{self.validation.ban_after} contributions rejected", by="validator")

    def _maybe_seal(self) -> Seal | None:
        rnd = self.replica.round
        self.history.open_round(rnd, base_hash=self.replica.base_hash, at=self.clock())
        pool = self.replica.pool()
        accepted = [c for c in pool if (self.history.contribution(c) or {}).get("status") == "accepted"]
        if len(accepted) != len(pool) or not pool:
            return None  # something still unscored (arrived since) or nothing to seal
        opened_at = self.history.current_round()["opened_at"]
        if len(pool) >= self.run.rounds.quorum:
            reason = "quorum"
        elif self.clock() - opened_at >= self.run.rounds.deadline_s:
            reason = "deadline"
        else:
            return None
        seal = self.replica.seal(self.identity)
        self._record_seal(seal, reason=reason)
        self.publish_seal(seal)
        self.replica.compact(keep_rounds=COMPACT_KEEP_ROUNDS)
        log.info(
            "sealed round %d (%s): %d contribution(s), weights %s",
            seal.round,
            reason,
            len(seal.contribution_ids),
            seal.weights_hash[:12],
        )
        return seal

    def _record_seal(self, seal: Seal, *, reason: str) -> None:
        """Checkpoint the weights `seal` produced (round + 1), measure them, and record it all."""
        weights = (
            self.replica.weights(include_open_round=False) if seal.round + 1 == self.replica.round else None
        )
        metrics: dict[str, float] = {}
        if weights is not None:
            if self.history.checkpoint(seal.round + 1) is None:
                self._save_checkpoint(seal.round + 1, weights, seal)
            evaluation = self.validator.evaluate(weights)
            metrics = {"val_loss": evaluation.loss, "val_ppl": math.exp(min(evaluation.loss, 50.0))}
            metrics |= {f"firing_rate/{k}": v for k, v in evaluation.rates.items() if k != "overall"}
            metrics["firing_rate_mean"] = evaluation.rates.get("overall", math.nan)
        metrics["contributors"] = len(seal.contribution_ids)
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
            removal = self.replica.remove(cid, reason=reason, identity=self.identity)
        except MergeError as e:
            log.warning("could not remove %s: %s", cid[:16], e)
            return
        self.history.record_revocation(cid, reason=reason, by=by, at=self.clock())
        self.publish_removal(removal)
        log.info("removed contribution %s: %s", cid[:16], reason)

    def revoke(self, contribution_id: str, *, reason: str, by: str) -> None:
        """Remove a contribution from the set (signed by this authority) and record why."""
        with self.lock:
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
        with self.lock:
            self.history.ban(peer, reason=reason, by=by, at=self.clock())
            for cid, envelope in self.replica.contributions():
                if envelope.peer_key.hex() == peer and cid in self.replica.pool():
                    self._reject(cid, f"peer banned: {reason}", by=by)
