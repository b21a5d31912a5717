"""The simulated swarm's shared state: who holds which contribution and seal since when.

Nodes are numbered: 0 is the coordinator, 1..relays the relay peers, then the volunteers. For each
round q still in play, `held[q][node, c]` is the simulated time at which `node` holds contribution c of
round q (inf: never). Writes may lie in the future: a transfer decided now lands when its bytes have
arrived, and every reader compares with its own clock, so nobody sees a payload before it lands.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import simpy

from nord.protocol import admission_error, adopt_by_contributions
from nord.sim import costs
from nord.sim.inputs import SimConfig, Traits
from nord.sim.network import Dht, Network

COORDINATOR = 0
BACKOFF_S = 15.0  # nord.gossip.wire.BACKOFF_S: a peer that failed a request is skipped this long
DHT_HOPS_RTT = 3  # a DHT get takes about this many round trips
MAX_HOLDERS_TRIED = 8  # nord.gossip.aggregates.MAX_HOLDERS_TRIED: holders asked for one round per pass
MAX_FETCH_IDS = 4096  # nord.gossip.wire.MAX_FETCH_IDS: contribution ids in one fetch request
INF = np.float32(np.inf)


@dataclass
class Round:
    """Contributions of one round, as columns of `held`."""

    held: np.ndarray  # (nodes, capacity) float32 arrival times
    nbytes: np.ndarray  # (capacity,) int64 envelope bytes
    author: list[int] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)  # "", "poison", "equivocate"
    published: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.author)


@dataclass
class SealInfo:
    round: int
    listed: dict[int, list[int]]  # contribution round -> columns
    contributions_bytes: int  # envelope bytes of the listed contributions
    nbytes: int
    at: float
    reason: str


class World:
    """State and bookkeeping shared by the volunteer, relay and coordinator processes."""

    def __init__(
        self, cfg: SimConfig, volunteers: list[Traits], sizes: costs.Sizes, coordinator_link
    ) -> None:
        self.cfg, self.sizes, self.volunteers = cfg, sizes, volunteers
        self.env = simpy.Environment()
        self.rng = random.Random(cfg.seed + 1)
        self.first_volunteer = 1 + cfg.relays
        self.n_nodes = self.first_volunteer + len(volunteers)
        down, up = coordinator_link
        lat = cfg.rtt_ms / 4e3  # a datacenter peer's share of a one-way delay (inputs.latency)
        self.net = Network(
            up_bps=[up] * self.first_volunteer + [v.up_bps for v in volunteers],
            down_bps=[down] * self.first_volunteer + [v.down_bps for v in volunteers],
            latency_s=[lat] * self.first_volunteer + [v.latency_s for v in volunteers],
        )
        self.dht = Dht(record_bytes=costs.record_bytes())
        self.aggregate_dht = Dht(record_bytes=costs.aggregate_record_bytes())  # nord/<run>/aggregate/<round>
        self.aggregate_holders: dict[int, list[tuple[float, int]]] = {}  # round -> [(announced at, peer)]
        self.request_s = costs.REQUEST_S  # CPU a served request costs besides its payload's merge
        self.client = [False] * self.first_volunteer + [v.client_mode for v in volunteers]
        self.hostile = [""] * self.first_volunteer + [v.hostile for v in volunteers]
        self.online = [True] * self.first_volunteer + [False] * len(volunteers)
        self.live_public: dict[int, bool] = {i: False for i in range(self.first_volunteer)}
        self.round_of = [0] * self.n_nodes  # each node's open round
        self.adopted: dict[int, dict[int, float]] = {}  # round -> node -> when it adopted that seal
        self.backoff = [dict() for _ in range(self.n_nodes)]
        self.capacity = len(volunteers) + sum(v.hostile == "equivocate" for v in volunteers)
        self.rounds: dict[int, Round] = {}
        self.seals: dict[int, SealInfo] = {}
        self.seal_held = np.full((self.n_nodes, cfg.rounds + 1), INF, dtype=np.float32)
        self.rejected: set[tuple[int, int]] = set()  # (round, column) removed by the authority
        self.retired: list[dict] = []  # per-contribution spread metrics of rounds out of play
        self.counters: dict[str, int] = {}
        self.useful_train_s = 0.0
        self.finished = self.env.event()
        self.changed = self.env.event()  # fires (and is replaced) at each publication and seal
        self.sealed = self.env.event()  # fires (and is replaced) at each seal
        self.last_pass = [0.0] * self.n_nodes
        self.idle_digest_bytes = 0  # digests of skipped idle passes (counted on the idle node only)

    # ---- bookkeeping --------------------------------------------------------------------------------
    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] = self.counters.get(what, 0) + n

    def round_state(self, q: int) -> Round:
        if q not in self.rounds:
            held = np.full((self.n_nodes, self.capacity), INF, dtype=np.float32)
            self.rounds[q] = Round(held=held, nbytes=np.zeros(self.capacity, dtype=np.int64))
        return self.rounds[q]

    def window(self, node: int) -> range:
        r, s = self.round_of[node], self.cfg.max_staleness
        return range(max(0, r - s), r + s + 1)

    def notify(self, seal: bool = False) -> None:
        """Wake every idle peer: something new was published or (`seal`) sealed."""
        changed, self.changed = self.changed, self.env.event()
        changed.succeed()
        if seal:
            sealed, self.sealed = self.sealed, self.env.event()
            sealed.succeed()

    def seals_only(self, node: int) -> bool:
        """Whether `node` waits for seals alone: a volunteer adopting aggregates gathers no contributions."""
        return self.cfg.adopt != "contributions" and node >= self.first_volunteer

    def next_change(self, node: int, now: float) -> float:
        """The earliest time after `now` at which a public peer will hold something `node` lacks in its
        window, or its next seal (inf if nothing is on its way). A volunteer that adopts aggregates waits
        for its next seal only, and for the next pass (`now`) once a public peer or itself holds it."""
        public = np.fromiter(self.live_public, dtype=np.int64)
        r = self.round_of[node]
        soon = math.inf
        if self.seals_only(node) and self.seal_held[[node, *public], min(r, self.cfg.rounds)].min() <= now:
            return now  # the seal is here or at a public peer: the next pass may adopt it
        if r in self.seals and len(public):
            times = self.seal_held[public, r]
            later = times[times > now]
            soon = float(later.min()) if len(later) else soon
        for q in () if self.seals_only(node) else self.window(node):
            rs = self.rounds.get(q)
            if rs is None or not len(public):
                continue
            lack = rs.held[node, : rs.n] > now
            if lack.any():
                times = rs.held[np.ix_(public, np.flatnonzero(lack))]
                later = times[(times > now) & np.isfinite(times)]
                if len(later):
                    soon = min(soon, float(later.min()))
        return soon

    def set_online(self, node: int, online: bool) -> None:
        self.online[node] = online
        if not self.client[node]:
            if online:
                self.live_public[node] = False
            else:
                self.live_public.pop(node, None)

    # ---- holding ------------------------------------------------------------------------------------
    def deliver(self, node: int, q: int, cols: np.ndarray, at: float) -> np.ndarray:
        """`node` holds columns `cols` of round q from `at` on, if its replica admits them; the admitted."""
        refused = admission_error(
            round=q,
            base_hash="sealed",
            open_round=self.round_of[node],
            base_at_round="sealed",
            max_staleness=self.cfg.max_staleness,
            pooled=0,
            capacity=self.capacity,
        )
        if refused or not len(cols):
            if refused:
                self.count("refused_by_replica", len(cols))
            return cols[:0]
        rs = self.rounds[q]
        total = int(rs.nbytes[cols].sum())
        work = len(cols) * costs.merge_s(0, self.sizes.params) + costs.MERGE_S_PER_BYTE * total  # summed
        done = self.net.compute(node, self.cfg.cost_scale * work, at)
        row = rs.held[node]
        new = int(np.count_nonzero(np.isinf(row[cols])))
        row[cols] = np.minimum(row[cols], np.float32(done))
        self.net.bytes_up[node] += self.dht.announce(q, new, done)  # `_announce_holder`, after the join:
        stores = new * min(costs.DHT_REPLICAS, self.n_nodes - 1)  # it delays later work, not this one
        self.net.compute(node, stores * self.request_s, done)
        return cols

    def add_contribution(self, node: int, q: int, hostile: str, now: float, train_s: float) -> list[int]:
        """A volunteer's round-q contribution (two payloads for an equivocator), held by it from `now`."""
        rs = self.round_state(q)
        cols = []
        for _ in range(2 if hostile == "equivocate" else 1):
            c = rs.n
            rs.author.append(node)
            rs.nbytes[c] = self.sizes.envelope_bytes(q)
            rs.kind.append(hostile if hostile in ("poison", "equivocate") else "")
            rs.published.append(now)
            rs.train_s.append(train_s)
            rs.held[node, c] = now
            cols.append(c)
        self.notify()
        return cols

    def lacking(self, node: int, q: int, now: float) -> np.ndarray:
        rs = self.rounds[q]
        return rs.held[node, : rs.n] > now

    def try_advance(self, node: int, now: float) -> float:
        """Adopt every seal `node` holds whose listed contributions it holds too (fold cost each), or,
        with adopt "aggregate" or "auto", once it downloaded the seal's aggregate or (auto, when fewer
        bytes) the listed contributions it lacks. Returns when the last adoption is done (`now` if none)."""
        end = now
        while True:
            r = self.round_of[node]
            seal = self.seals.get(r)
            if seal is None or self.seal_held[node, r] > now:
                return end
            ready = float(self.seal_held[node, r])
            for q, cols in seal.listed.items():
                if cols:
                    if q not in self.rounds:  # retired: this node lags, it restarts from a snapshot
                        return end
                    ready = max(ready, float(self.rounds[q].held[node, cols].max()))
            if ready > now and self.cfg.adopt != "contributions" and node != COORDINATOR:
                start = max(float(self.seal_held[node, r]), end)
                ready = (
                    self.fetch_listed(node, seal, start)
                    if self.contributions_cheaper(node, seal, start)
                    else math.inf
                )
                if not math.isfinite(ready):  # (e478b41: the bootstrap peers no longer hold them all)
                    ready = self.fetch_aggregate(node, seal, start)
            if ready > now and (self.cfg.adopt == "contributions" or not math.isfinite(ready)):
                return end
            end = self.net.compute(node, self.cfg.cost_scale * costs.fold_s(self.sizes.params), ready)
            self.round_of[node] = r + 1
            self.adopted.setdefault(r, {})[node] = end
            if self.seals_only(node) and not self.client[node]:
                self.net.bytes_up[node] += self.aggregate_dht.announce(r, 1, end)  # `Aggregates._announce`
                self.aggregate_holders.setdefault(r, []).append((end, node))

    def contributions_cheaper(self, node: int, seal: SealInfo, now: float) -> bool:
        """`Aggregates._contributions_cheaper` (adopt="auto"): the real `adopt_by_contributions`, with this
        node's own contribution to the open round as the typical size and density (none: aggregate)."""
        r = seal.round
        rs = self.rounds.get(r)
        if self.cfg.adopt != "auto" or rs is None or node not in rs.author:
            return False
        missing = sum(int((self.rounds[q].held[node, c] > now).sum()) for q, c in seal.listed.items())
        listed = sum(map(len, seal.listed.values()))
        return adopt_by_contributions(
            missing, self.sizes.envelope_bytes(r), listed, costs.density(r), self.sizes.params
        )

    def fetch_listed(self, node: int, seal: SealInfo, now: float) -> float:
        """`Aggregates._fetch_listed`: the seal's contributions this node lacks, from the bootstrap peers
        (coordinator, relays) in random order, MAX_FETCH_IDS per request. When it holds them all (inf: not
        now)."""
        boot = [p for p in range(self.first_volunteer) if self.backoff[node].get(p, 0.0) <= now]
        self.rng.shuffle(boot)
        t = now
        for peer in boot:
            if not self.online[peer]:
                t = self.net.request(node, peer, costs.SMALL_MESSAGE_BYTES, costs.SMALL_MESSAGE_BYTES, t)
                self.backoff[node][peer] = t + BACKOFF_S
                self.count("failed_requests")
                continue
            for q, cols in seal.listed.items():
                if q not in self.rounds:
                    continue
                row, peer_row = self.rounds[q].held[node], self.rounds[q].held[peer]
                ids = np.asarray([c for c in cols if row[c] > t and peer_row[c] <= t], dtype=np.int64)
                for start in range(0, len(ids), MAX_FETCH_IDS):
                    chunk = ids[start : start + MAX_FETCH_IDS]
                    reply = int(self.rounds[q].nbytes[chunk].sum())
                    arrive = self.net.request(node, peer, costs.FETCH_BYTES_PER_ID * len(chunk), reply, t)
                    self.deliver(node, q, chunk, arrive)
            self.count("listed_fetched")
            held = max(float(self.rounds[q].held[node, c].max()) for q, c in seal.listed.items() if c)
            if math.isfinite(held):  # (try_advance calls this only while every listed round is in play)
                return held
        return math.inf

    def fetch_aggregate(self, node: int, seal: SealInfo, now: float) -> float:
        """`Aggregates._adopt_round`: read the round's holder records (one per public peer that adopted),
        try at most MAX_HOLDERS_TRIED of them in random order, then the bootstrap peers (coordinator,
        relays), skipping those in backoff; download from the first that has it. Arrival time (inf: none)."""
        r, backoff = seal.round, self.backoff[node]
        ok, nbytes = self.aggregate_dht.get(r, now)
        self.net.bytes_down[node] += nbytes
        t = now + DHT_HOPS_RTT * 2 * self.net.latency_s[node]
        ttl = self.aggregate_dht.ttl_s
        announced = [p for at, p in self.aggregate_holders.get(r, ()) if ok and at <= now < at + ttl]
        boot = [p for p in range(self.first_volunteer) if p not in announced]
        self.rng.shuffle(announced)
        self.rng.shuffle(boot)
        holders = [p for p in announced + boot if p != node and backoff.get(p, 0.0) <= t]
        for holder in holders[:MAX_HOLDERS_TRIED]:
            if not (self.online[holder] and self.hostile[holder] != "withhold" and self.round_of[holder] > r):
                t = self.net.request(node, holder, costs.SMALL_MESSAGE_BYTES, costs.SMALL_MESSAGE_BYTES, t)
                backoff[holder] = t + BACKOFF_S
                self.count("failed_requests")
                continue
            counts = {q: len(cols) for q, cols in seal.listed.items() if cols}
            nbytes = costs.aggregate_bytes(counts, self.sizes.params)
            self.count("aggregates_fetched")
            return self.net.request(node, holder, costs.SMALL_MESSAGE_BYTES, nbytes, t)
        return math.inf

    def retire_before(self, q_min: int) -> None:
        """Summarise and drop rounds below `q_min` (no replica can fold them any more)."""
        for q in sorted(k for k in self.rounds if k < q_min):
            rs = self.rounds.pop(q)
            if not rs.n:
                continue
            vols = np.arange(self.first_volunteer, self.n_nodes)
            t_mid = float(np.median(rs.published))  # one online mask per round keeps this O(N)
            watch = vols[[self.hostile[i] == "" and self.was_online(int(i), t_mid) for i in vols]]
            times = rs.held[watch, : rs.n].astype(np.float64) - np.asarray(rs.published)[None, :]
            t50, t99 = column_quantile(times, 0.5), column_quantile(times, 0.99)
            for c in range(rs.n):
                self.retired.append(
                    {
                        "round": q,
                        "col": c,
                        "author": rs.author[c],
                        "kind": rs.kind[c],
                        "bytes": int(rs.nbytes[c]),
                        "t50": t50[c],
                        "t99": t99[c],
                    }
                )

    def was_online(self, volunteer_node: int, t: float) -> bool:
        sessions = self.volunteers[volunteer_node - self.first_volunteer].sessions
        return any(a <= t < b for a, b in sessions)


def column_quantile(times: np.ndarray, q: float) -> list[float]:
    """The q-quantile of each column, inf counting as never (inf when more than 1 − q never got it)."""
    if not times.shape[0]:
        return [math.nan] * times.shape[1]
    return [float(v) for v in np.quantile(times, q, axis=0, method="higher")]
