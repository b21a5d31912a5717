"""The coordinator process: `Authority.step` every TICK_S and anti-entropy every SYNC_EVERY_S.

It scores each contribution it holds (CPU time from the fitted model, `coordinator_cores` at once; a
poisoned one is rejected, a banned author's without scoring), pools what the replica would pool
(rounds R − max_staleness .. R, not folded, not rejected, one payload per dot: two payloads of one
dot are an equivocation and neither is pooled), and seals when `nord.protocol.seal_reason` says so.
A seal is pushed to every reachable peer, like `Gossip.publish_seal`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nord.protocol import reachable, seal_reason
from nord.sim import costs
from nord.sim.peers import anti_entropy
from nord.sim.world import COORDINATOR, SealInfo, World

TICK_S = 0.2  # coordinator.server.TICK_S
SYNC_EVERY_S = 5.0  # coordinator.server.SYNC_EVERY_S


class Authority:
    """The simulated authority's bookkeeping (what coordinator/history.py records), per round as arrays."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.verdict_at: dict[int, np.ndarray] = {}  # round -> when each column's verdict is due (inf: none)
        self.accepted: dict[int, np.ndarray] = {}  # round -> verdict per column
        self.folded: dict[int, np.ndarray] = {}  # round -> column folded by a seal
        self.settled: dict[int, np.ndarray] = {}  # round -> rejection applied
        self.rejections: dict[int, int] = {}  # author -> count
        self.banned: set[int] = set()
        self.staleness: list[int] = []  # seal round − contribution round, per folded contribution
        self.cores = [0.0] * world.cfg.coordinator_cores
        self.opened_at = 0.0
        self.score_s = 0.0

    def _arrays(self, q: int) -> None:
        if q not in self.verdict_at:
            cap = self.world.capacity
            self.verdict_at[q] = np.full(cap, np.inf)
            self.accepted[q] = np.zeros(cap, dtype=bool)
            self.folded[q] = np.zeros(cap, dtype=bool)
            self.settled[q] = np.zeros(cap, dtype=bool)

    def observe(self, now: float) -> None:
        """Queue every newly held contribution for scoring (or reject a banned author's at once)."""
        w, cfg = self.world, self.world.cfg
        for q in w.window(COORDINATOR):
            rs = w.rounds.get(q)
            if rs is None:
                continue
            self._arrays(q)
            new = (rs.held[COORDINATOR, : rs.n] <= now) & np.isinf(self.verdict_at[q][: rs.n])
            for c in np.flatnonzero(new):
                if rs.author[c] in self.banned:
                    self.verdict_at[q][c] = now
                    continue
                seconds = cfg.cost_scale * (
                    costs.merge_s(int(rs.nbytes[c]), w.sizes.params) + costs.validate_s(w.sizes.params)
                )
                core = min(range(len(self.cores)), key=self.cores.__getitem__)
                self.cores[core] = max(now, self.cores[core]) + seconds
                self.score_s += seconds
                self.verdict_at[q][c] = self.cores[core]
                self.accepted[q][c] = rs.kind[c] != "poison"

    def settle(self, now: float) -> None:
        """Apply verdicts that are due: removals of rejected contributions, bans."""
        w = self.world
        for q, due in self.verdict_at.items():
            rs = w.rounds.get(q)
            if rs is None:
                continue
            for c in np.flatnonzero((due <= now) & ~self.accepted[q] & ~self.settled[q]):
                self.settled[q][c] = True
                w.rejected.add((q, int(c)))
                author = rs.author[c]
                self.rejections[author] = self.rejections.get(author, 0) + 1
                if self.rejections[author] >= w.cfg.ban_after:
                    self.banned.add(author)
                for peer in reachable(w.live_public, {}, now):  # `publish_removal`
                    if peer != COORDINATOR:
                        w.net.send(COORDINATOR, peer, costs.SMALL_MESSAGE_BYTES * 4, now)

    def pool(self, now: float) -> list[tuple[int, np.ndarray]]:
        """(round, columns) the replica pools now: foldable, not rejected, one payload per dot."""
        w, r = self.world, self.world.round_of[COORDINATOR]
        out = []
        for q in range(max(0, r - w.cfg.max_staleness), r + 1):
            rs = w.rounds.get(q)
            if rs is None or not rs.n:
                continue
            self._arrays(q)
            held = rs.held[COORDINATOR, : rs.n] <= now
            authors = np.asarray(rs.author)
            counts = np.bincount(authors[held], minlength=w.n_nodes)
            ok = held & (counts[authors] == 1) & ~self.folded[q][: rs.n] & ~self.settled[q][: rs.n]
            ok &= ~((self.verdict_at[q][: rs.n] <= now) & ~self.accepted[q][: rs.n])
            if ok.any():
                out.append((q, np.flatnonzero(ok)))
        return out

    def maybe_seal(self, now: float) -> bool:
        w, cfg = self.world, self.world.cfg
        pool = self.pool(now)
        pooled = sum(len(cols) for _, cols in pool)
        reason = seal_reason(
            pooled=pooled,
            all_accepted=all(
                bool(np.all((self.verdict_at[q][cols] <= now) & self.accepted[q][cols])) for q, cols in pool
            ),
            age_s=now - self.opened_at,
            quorum=cfg.quorum,
            deadline_s=cfg.deadline_s,
        )
        if reason is None:
            return False
        r = w.round_of[COORDINATOR]
        listed = {q: [int(c) for c in cols] for q, cols in pool}
        for q, cols in pool:
            self.folded[q][cols] = True
            self.staleness += [r - q] * len(cols)
            w.useful_train_s += float(np.sum(np.asarray(w.rounds[q].train_s)[cols]))
        done = w.net.compute(COORDINATOR, cfg.cost_scale * costs.fold_s(w.sizes.params), now)
        seal = SealInfo(
            round=r,
            listed=listed,
            contributions_bytes=sum(int(w.rounds[q].nbytes[cols].sum()) for q, cols in pool),
            nbytes=costs.seal_bytes(pooled),
            at=done,
            reason=reason,
        )
        w.seals[r] = seal
        w.seal_held[COORDINATOR, r] = done
        w.round_of[COORDINATOR] = r + 1
        w.adopted.setdefault(r, {})[COORDINATOR] = done
        for peer in reachable(w.live_public, {}, done):  # `publish_seal`
            if peer != COORDINATOR:
                arrive = w.net.send(COORDINATOR, peer, seal.nbytes, done)
                w.seal_held[peer, r] = min(w.seal_held[peer, r], arrive)
        self.opened_at = done
        w.retire_before(r - cfg.max_staleness)
        w.notify(seal=True)
        return True


def coordinator(world: World, authority: Authority, on_seal: Callable[[int], None]):
    """`coordinator.server.loop` until `cfg.rounds` rounds are sealed, then `world.finished`."""
    env, cfg = world.env, world.cfg
    world.set_online(COORDINATOR, True)
    last_sync = 0.0
    while world.round_of[COORDINATOR] < cfg.rounds:
        now = env.now
        authority.observe(now)
        authority.settle(now)
        if authority.maybe_seal(now):
            on_seal(world.round_of[COORDINATOR])
        if now - last_sync >= SYNC_EVERY_S:
            last_sync = now
            yield from anti_entropy(world, COORDINATOR, 1)
        yield env.timeout(TICK_S)
    world.finished.succeed()
