"""Peer processes: a volunteer's round (train, publish, anti-entropy until the seal) and a relay's loop.

The steps are `nord.gossip.Gossip`'s, with its decisions taken by the same functions (nord.protocol):
`publish` pushes to every reachable peer; `anti_entropy` pulls what the DHT announces from the holder
of most of it (`next_fetch`'s rule, vectorized in `dense_next_fetch`, over the public holders:
client-mode ones are never tried), then syncs
with `sync_partners(reachable(...), fanout)`: digest one way, what we lack back (in replies of at most
SYNC_BUDGET_BYTES of envelopes, `budgeted_count`), then a push of what the partner lacks. A peer that
fails a request (a withholding peer, or one gone offline) is skipped for BACKOFF_S.
"""

from __future__ import annotations

import math

import numpy as np

from nord.protocol import budgeted_count, reachable, sync_partners
from nord.sim import costs
from nord.sim.world import BACKOFF_S, DHT_HOPS_RTT, World

SYNC_BUDGET_BYTES = 32 << 20  # nord.gossip.wire.SYNC_BUDGET_BYTES


def serves(world: World, node: int) -> bool:
    """Whether `node` answers requests now (online, and not withholding)."""
    return world.online[node] and world.hostile[node] != "withhold"


def held_dots(world: World, node: int, now: float) -> int:
    """Dots in `node`'s digest window (one per held contribution there)."""
    return sum(
        int(np.count_nonzero(world.rounds[q].held[node, : world.rounds[q].n] <= now))
        for q in world.window(node)
        if q in world.rounds
    )


def send_envelopes(world: World, src: int, dst: int, q: int, cols: np.ndarray, now: float) -> float:
    """Envelopes from src to dst in messages of at most SYNC_BUDGET_BYTES each; the arrival time."""
    sizes = world.rounds[q].nbytes[cols].tolist()
    t, start = now, 0
    while start < len(sizes):
        k = budgeted_count(sizes[start:], SYNC_BUDGET_BYTES)
        t = world.net.request(dst, src, costs.SMALL_MESSAGE_BYTES, sum(sizes[start : start + k]), t)
        start += k
    world.deliver(dst, q, cols, t)
    return t


def publish(world: World, node: int, q: int, cols: list[int], now: float) -> None:
    """`Gossip.publish`: announce, then push each envelope to every reachable peer (an equivocator
    sends its two payloads to two halves of them)."""
    world.net.bytes_up[node] += world.dht.announce(q, len(cols), now)
    targets = reachable(world.live_public, world.backoff[node], now)
    if world.seals_only(node):  # only the authority (and the relays) gather contributions
        targets = [t for t in targets if t < world.first_volunteer]
    targets = [t for t in targets if t != node]
    rs = world.rounds[q]
    for k, col in enumerate(cols):
        share = targets[k :: len(cols)]
        for target in share:
            done = world.net.send(node, target, int(rs.nbytes[col]) + costs.SMALL_MESSAGE_BYTES, now)
            if world.online[target]:
                done = world.net.compute(target, world.request_s, done)
                world.deliver(target, q, np.array([col]), done)


def dense_next_fetch(
    holds: np.ndarray, skip: np.ndarray, counts: np.ndarray | None = None
) -> tuple[int, np.ndarray] | None:
    """`nord.protocol.next_fetch` on a dense table: `holds[i, j]` says holder i announced lacked item j,
    `skip[i]` that holder i was tried. (row of the holder of most, its columns), or None. Same rule,
    vectorized: the Counter over every (item, holder) pair is the simulator's hot spot at N = 1,000;
    tests/nord/test_sim.py checks that both pick a holder of the same count and the same items.
    `counts` (holds' row sums, kept by the caller as it clears columns) saves recounting the table."""
    counts = holds.sum(axis=1) if counts is None else counts.copy()
    counts[skip] = 0
    row = int(np.argmax(counts)) if len(counts) else 0
    if not len(counts) or counts[row] == 0:
        return None
    return row, np.flatnonzero(holds[row])


def pull_announced(world: World, node: int, now: float) -> float:
    """`Gossip.pull_announced` over the node's window; the time it is done."""
    t = now
    tried = {p for p, until in world.backoff[node].items() if until > now}
    public = np.fromiter(world.live_public, dtype=np.int64)
    for q in world.window(node):
        if q not in world.rounds:
            continue
        ok, nbytes = world.dht.get(q, t)
        t += DHT_HOPS_RTT * 2 * world.net.latency_s[node]
        world.net.bytes_down[node] += nbytes
        if not ok:
            continue
        rs = world.rounds[q]
        lack = np.flatnonzero(world.lacking(node, q, t))
        if not len(lack) or not len(public):
            continue
        holds = rs.held[np.ix_(public, lack)] <= t  # announced holders (public: the others are never tried)
        skip = np.array([int(p) in tried or p == node for p in public], dtype=bool)
        counts = holds.sum(axis=1)
        while True:
            step = dense_next_fetch(holds, skip, counts)
            if step is None:
                break
            row, cols = step
            holder, ids = int(public[row]), lack[cols].tolist()
            skip[row] = True
            tried.add(holder)
            if not serves(world, holder):
                t = world.net.request(node, holder, costs.SMALL_MESSAGE_BYTES, costs.SMALL_MESSAGE_BYTES, t)
                world.backoff[node][holder] = t + BACKOFF_S
                world.count("failed_requests")
                continue
            request = costs.FETCH_BYTES_PER_ID * len(ids)
            sizes = rs.nbytes[ids].tolist()
            k = budgeted_count(sizes, SYNC_BUDGET_BYTES)  # `_on_fetch` answers within the budget
            t = world.net.request(node, holder, request, sum(sizes[:k]), t)
            world.deliver(node, q, np.array(ids[:k], dtype=np.int64), t)
            counts -= holds[:, cols[:k]].sum(axis=1)
            holds[:, cols[:k]] = False  # fetched: nobody is asked for them again
    return t


def sync_with(world: World, node: int, peer: int, now: float, contributions: bool = True) -> float:
    """`Gossip.sync_with`: digest → what we lack (+ seals; seals only when not `contributions`), then
    one push of what the peer lacks, at most SYNC_BUDGET_BYTES of envelopes (`within_budget`), which a
    seals-only peer sends too."""
    digest = costs.digest_bytes(held_dots(world, node, now))
    if not serves(world, peer):
        t = world.net.request(node, peer, digest, costs.SMALL_MESSAGE_BYTES, now)
        world.backoff[node][peer] = t + BACKOFF_S
        world.count("failed_requests")
        return t
    reply_digest = costs.digest_bytes(held_dots(world, peer, now))
    t = world.net.request(node, peer, digest, reply_digest, now)
    r = world.round_of[node]
    while r in world.seals and world.seal_held[peer, r] <= now:  # seals the peer holds (adopted or not)
        if world.seal_held[node, r] > now:
            arrive = world.net.send(peer, node, world.seals[r].nbytes, t)
            world.seal_held[node, r] = min(world.seal_held[node, r], arrive)
        r += 1
    end, budget = t, SYNC_BUDGET_BYTES  # what the peer lacks goes in one push of at most the budget
    for q in world.window(node):
        if q not in world.rounds:
            continue
        rs = world.rounds[q]
        have_peer, have_me = rs.held[peer, : rs.n] <= now, rs.held[node, : rs.n] <= now
        give = np.flatnonzero(have_peer & ~have_me) if contributions else ()
        if len(give):
            end = max(end, send_envelopes(world, peer, node, q, give, t))
        take = np.flatnonzero(have_me & ~have_peer)
        wanted = world.cfg.sync_push == "all" or not world.seals_only(peer)
        if len(take) and world.online[peer] and budget > 0 and wanted:
            take = take[: budgeted_count(rs.nbytes[take].tolist(), budget)]
            budget -= int(rs.nbytes[take].sum())
            end = max(end, send_envelopes(world, node, peer, q, take, t))
    return end


def anti_entropy(world: World, node: int, fanout: int):
    """One `Gossip.anti_entropy` pass (a SimPy process step: yields until it is done)."""
    now = world.env.now
    contributions = not world.seals_only(node)  # the coordinator and relays gather every contribution
    t = pull_announced(world, node, now) if contributions else now
    candidates = [p for p in reachable(world.live_public, world.backoff[node], t) if p != node]
    for peer in sync_partners(candidates, fanout, world.rng):
        t = sync_with(world, node, peer, t, contributions)
    t = max(t, world.try_advance(node, t))
    world.last_pass[node] = t
    if t > world.env.now:
        yield world.env.timeout(t - world.env.now)


def idle(world: World, node: int, until: float):
    """Wait for the next anti-entropy pass that can bring something: until `until` (something this node
    lacks lands on a public peer) or the next publication or seal. The passes skipped meanwhile would
    have found nothing new; their bytes (DHT gets, digests both ways) are counted all the same."""
    env, cfg = world.env, world.cfg
    wait = max(cfg.poll_s, until - env.now)
    news = world.sealed if world.seals_only(node) else world.changed
    if math.isfinite(wait):
        yield env.any_of([env.timeout(wait), news])
    else:
        yield news
    skipped = int((env.now - world.last_pass[node]) / cfg.poll_s) - 1
    if skipped > 0:
        digest = costs.digest_bytes(held_dots(world, node, env.now))
        pulls = cfg.adopt == "contributions"  # with aggregates, volunteers read no holder records
        dht = sum(world.dht.get(q, env.now)[1] for q in world.window(node) if q in world.rounds and pulls)
        world.dht.bytes_read += (skipped - 1) * dht  # `get` counted one of them
        world.net.bytes_down[node] += skipped * (dht + cfg.fanout * digest)
        world.net.bytes_up[node] += skipped * cfg.fanout * digest
        world.idle_digest_bytes += 2 * skipped * cfg.fanout * digest
    if env.now % cfg.poll_s:  # passes run on the poll grid
        yield env.timeout(cfg.poll_s - env.now % cfg.poll_s)


def relay(world: World, node: int):
    """A public peer that only serves gossip (and keeps itself current with one partner a pass)."""
    world.set_online(node, True)
    while not world.finished.triggered:
        yield from anti_entropy(world, node, 1)
        yield world.env.timeout(world.cfg.poll_s)


def catch_up(world: World, node: int, now: float) -> float:
    """A volunteer whose next seal lists contributions no longer in play restarts from a snapshot
    (the worker's `_catch_up` when peers have compacted past it)."""
    seal = world.seals.get(world.round_of[node])
    if seal is None or all(q in world.rounds for q, cols in seal.listed.items() if cols):
        return now  # the contributions its next seal lists are still in play
    sources = [p for p in reachable(world.live_public, world.backoff[node], now) if serves(world, p)]
    if not sources:
        return now
    source = world.rng.choice(sources)
    t = world.net.request(node, source, costs.SMALL_MESSAGE_BYTES, world.sizes.snapshot_bytes, now)
    world.round_of[node] = world.round_of[source]
    world.count("snapshots")
    return t


def volunteer(world: World, node: int):
    """`nord-node join` over the volunteer's sessions: train H steps, publish, anti-entropy to the seal."""
    env, cfg = world.env, world.cfg
    traits = world.volunteers[node - world.first_volunteer]
    contributed: set[int] = set()
    for start, end in traits.sessions:
        if start > env.now:
            yield env.timeout(start - env.now)
        if world.finished.triggered:
            return
        world.set_online(node, True)
        t = catch_up(world, node, env.now)
        if t > env.now:
            yield env.timeout(t - env.now)
        while env.now < end and not world.finished.triggered:
            t = catch_up(world, node, env.now)
            if t > env.now:
                yield env.timeout(t - env.now)
            r = world.round_of[node]
            if r not in contributed:
                if env.now + traits.train_s > end:  # preempted mid-round: the work is lost
                    world.count("preempted_rounds")
                    yield env.timeout(max(0.0, end - env.now))
                    break
                yield env.timeout(traits.train_s)
                contributed.add(r)
                cols = world.add_contribution(node, r, traits.hostile, env.now, traits.train_s)
                publish(world, node, r, cols, env.now)
            yield from anti_entropy(world, node, cfg.fanout)
            if world.round_of[node] == r:
                yield from idle(world, node, min(end, world.next_change(node, env.now)))
        world.set_online(node, False)
