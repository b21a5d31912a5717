"""The simulated network: per-peer access links with queues, latency, byte accounting, and the DHT.

A transfer of B bytes from a to b starts when both a's uplink and b's downlink are free, takes
B / min(up_a, down_b) seconds on both (each link serves its transfers one after another, which gives
the same finishing time for the last of several transfers as fair sharing would), and arrives
latency_a + latency_b later. Messages under `SMALL` bytes (digests, requests, acknowledgements) do not
queue: on a real connection they interleave with bulk streams. CPU work (decode and merge, scoring,
folding a seal) queues the same way on each peer's `cpu_free`.

The DHT is a count of holder records per round key: a `get_records` returns all of them in one
message, which hivemind drops above 4 MiB (../shared/notes/hivemind.md), so such a get fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMALL = 64 << 10
DHT_MESSAGE_CAP = 4 << 20  # hivemind peers reject larger messages (silently)


@dataclass
class Network:
    up_bps: list[float]
    down_bps: list[float]
    latency_s: list[float]
    up_free: list[float] = field(init=False)
    down_free: list[float] = field(init=False)
    cpu_free: list[float] = field(init=False)
    shared_cores: int = 0  # > 0: every node's CPU work queues on one pool of this many cores (loopback)
    bytes_up: list[int] = field(init=False)
    bytes_down: list[int] = field(init=False)
    cpu_s: list[float] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.up_bps)
        self.share_cores(self.shared_cores)
        self.up_free, self.down_free, self.cpu_free = [0.0] * n, [0.0] * n, [0.0] * n
        self.bytes_up, self.bytes_down, self.cpu_s = [0] * n, [0] * n, [0.0] * n

    def share_cores(self, cores: int) -> None:
        """Make every node's CPU work queue on one pool of `cores` (all processes on one machine)."""
        self.shared_cores, self.pool = cores, [0.0] * cores

    def send(self, src: int, dst: int, nbytes: int, now: float) -> float:
        """Account `nbytes` from src to dst sent at `now`; the time the last byte arrives."""
        self.bytes_up[src] += nbytes
        self.bytes_down[dst] += nbytes
        rate = min(self.up_bps[src], self.down_bps[dst])
        if nbytes < SMALL:
            start = now
        else:
            start = max(now, self.up_free[src], self.down_free[dst])
            self.up_free[src] = self.down_free[dst] = start + nbytes / rate
        return start + nbytes / rate + self.latency_s[src] + self.latency_s[dst]

    def request(self, src: int, dst: int, request_bytes: int, reply_bytes: int, now: float) -> float:
        """A request from src answered by dst; the time the reply has fully arrived at src."""
        return self.send(dst, src, reply_bytes, self.send(src, dst, request_bytes, now))

    def compute(self, node: int, seconds: float, ready: float) -> float:
        """Run `seconds` of CPU on `node` once it is free and the input is there at `ready`; the end."""
        self.cpu_s[node] += seconds
        if self.pool:
            core = min(range(len(self.pool)), key=self.pool.__getitem__)
            start = max(ready, self.pool[core])
            self.pool[core] = start + seconds
            return start + seconds
        start = max(ready, self.cpu_free[node])
        self.cpu_free[node] = start + seconds
        return start + seconds


@dataclass
class Dht:
    """Holder records per round key (each lives RECORD_TTL_S), and what reading them costs."""

    record_bytes: int
    ttl_s: float = 900.0  # nord.gossip.wire.RECORD_TTL_S
    bucket_s: float = 10.0  # records are counted per 10 s of storing time
    records: dict[int, dict[int, int]] = field(default_factory=dict)  # round -> time bucket -> count
    failed_gets: int = 0
    bytes_read: int = 0
    bytes_stored: int = 0

    def announce(self, rnd: int, count: int, at: float) -> int:
        """Store `count` holder records for round `rnd` at time `at`; bytes the storing peer sends."""
        if count:
            buckets = self.records.setdefault(rnd, {})
            key = int(at // self.bucket_s)
            buckets[key] = buckets.get(key, 0) + count
        nbytes = count * self.record_bytes
        self.bytes_stored += nbytes
        return nbytes

    def live(self, rnd: int, now: float) -> int:
        """Records of round `rnd` stored by `now` and not expired (to the bucket)."""
        buckets = self.records.get(rnd, {})
        first, last = int((now - self.ttl_s) // self.bucket_s), int(now // self.bucket_s)
        if len(buckets) <= last - first:
            return sum(n for k, n in buckets.items() if first <= k <= last)
        return sum(buckets.get(k, 0) for k in range(first, last + 1))

    def get(self, rnd: int, now: float) -> tuple[bool, int]:
        """(whether the reply arrives, its bytes) for a get of round `rnd`'s key at `now`."""
        nbytes = self.live(rnd, now) * self.record_bytes
        if nbytes > DHT_MESSAGE_CAP:
            self.failed_gets += 1
            return False, 0
        self.bytes_read += nbytes
        return True, nbytes
