"""The simulator's side of the loopback validation of bench/gossip.py's spread.

N peers on one machine, all public, one author: it adds a contribution and `publish`es it (the same
function the volunteers' processes call). Links are the loopback stream rate, every request costs
`request_s` on the peer that serves it (framing, hashing, handler thread: the measured wall time of a
small request), each holder record it then stores costs that on DHT_REPLICAS peers, merging costs the
fitted CPU time, and all processes' CPU work queues on the machine's `cores` (`Network.shared_cores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nord.sim import costs
from nord.sim.inputs import SimConfig, Traits
from nord.sim.peers import publish
from nord.sim.world import World


@dataclass(frozen=True, kw_only=True)
class Loopback:
    """What the machine gives: stream rate (bytes/s), one-way latency, wall time of a small request
    (it carries the machine's load: CPU costs are otherwise taken as fitted), cores."""

    bytes_per_s: float
    latency_s: float
    request_s: float
    cores: int


def spread(peers: int, model: str, machine: Loopback, rnd: int = 8) -> dict:
    """Seconds until every peer holds a new round-`rnd` contribution, and the author's bytes sent."""
    sizes = costs.measure_sizes(model)
    cfg = SimConfig(
        peers=peers - 1,
        rounds=1,
        model=model,
        client_share=0.0,
        straggler_share=0.0,
    )
    link = Traits(
        population="server",
        client_mode=False,
        down_bps=machine.bytes_per_s,
        up_bps=machine.bytes_per_s,
        latency_s=machine.latency_s,
        device="cpu",
        train_s=0.0,
        hostile="",
        sessions=((0.0, float("inf")),),
    )
    world = World(cfg, [link] * (peers - 1), sizes, (machine.bytes_per_s, machine.bytes_per_s))
    world.net.share_cores(machine.cores)
    world.net.latency_s = [machine.latency_s] * world.n_nodes  # node 0 too: every peer is on this machine
    world.request_s = machine.request_s
    for node in range(world.n_nodes):
        world.set_online(node, True)
        world.round_of[node] = rnd
    author = world.first_volunteer
    cols = world.add_contribution(author, rnd, "", 0.0, 0.0)
    publish(world, author, rnd, cols, 0.0)
    others = [i for i in range(world.n_nodes) if i != author]
    held = world.rounds[rnd].held[others, cols[0]].astype(np.float64)
    return {
        "peers": peers,
        "envelope_bytes": sizes.envelope_bytes(rnd),
        "all_hold_s": float(held.max()),
        "author_bytes_sent": world.net.bytes_up[author] - world.dht.record_bytes * len(cols),  # streams only
    }
