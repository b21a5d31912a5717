"""`nord simulate`: a discrete-event simulation (SimPy) of a run's swarm at 100 to 10,000 volunteers.

The peers' decisions are the real protocol's (`nord.protocol`: reachable peers, sync partners, which
holder to fetch from, reply budgets, replica admission, when to seal); payloads are their real encoded
sizes (`costs.measure_sizes` encodes a real delta with the real codec) and CPU work a model fitted to
timings of the real code (`bench/simulate.py --fit`). Nothing here imports hivemind.

Files: inputs.py (config and distributions), network.py (links, queues, the DHT), world.py (who holds
what since when), peers.py (volunteer and relay processes), coordinator.py (the authority's process),
metrics.py (summary and PNGs), cli.py (`nord simulate`).

Example:
    summary = simulate(SimConfig(peers=100, rounds=5, model="tiny"))
    summary["t99_s"]["p50"]
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nord.sim.inputs import LINKS, SimConfig, draw_volunteers

__all__ = ["SimConfig", "run_world", "simulate"]

HORIZON_S = 14 * 24 * 3600.0  # sessions are drawn this far ahead; runs stop at their last seal


def simulate(cfg: SimConfig, on_seal: Callable[[int], None] | None = None) -> dict:
    """Run one simulation until `cfg.rounds` rounds are sealed; the summary (metrics.summarize)."""
    from nord.sim.metrics import summarize

    started = time.perf_counter()
    world, authority = run_world(cfg, on_seal)
    return summarize(world, authority, time.perf_counter() - started)


def run_world(cfg: SimConfig, on_seal: Callable[[int], None] | None = None):
    """Build the swarm, run it until `cfg.rounds` seals; (World, Authority) for inspection."""
    from nord.sim import costs
    from nord.sim.coordinator import Authority, coordinator
    from nord.sim.peers import relay, volunteer
    from nord.sim.world import World

    sizes = costs.measure_sizes(cfg.model)
    volunteers = draw_volunteers(cfg, sizes.params, HORIZON_S)
    dc = LINKS["datacenter"]
    world = World(cfg, volunteers, sizes, (dc.down_mbps * 1e6 / 8, dc.up_mbps * 1e6 / 8))
    authority = Authority(world)
    world.env.process(coordinator(world, authority, on_seal or (lambda r: None)))
    for node in range(1, world.first_volunteer):
        world.env.process(relay(world, node))
    for node in range(world.first_volunteer, world.n_nodes):
        world.env.process(volunteer(world, node))
    world.env.run(until=world.finished)
    return world, authority
