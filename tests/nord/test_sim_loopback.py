"""The simulator against the real swarm: bench/gossip.py's spread on 127.0.0.1 (real hivemind, real
Gossip, real replicas), N = 4, 8, 16, beside `nord.sim.loopback.spread` fed with what this machine
measured in the same run (stream rate, small-request time, cores) and the fitted merge cost.

Tolerances (docs/simulation.md, "Validation"): bytes the author sends within 5% (the simulator counts
the envelope plus 64 bytes per push; framing and msgpack add ~100 bytes to a 29 kB envelope);
time until every peer holds it within a factor of 2 either way — the real medians themselves move by
2x between runs on this machine (0.296 to 0.597 s at N = 16 in docs/benchmarks/gossip.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.p2p
def test_simulated_spread_agrees_with_the_loopback_swarm():
    spec = importlib.util.spec_from_file_location("bench_simulate", ROOT / "bench" / "simulate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.validate([4, 8, 16], repeats=2)
    for row in out["rows"]:
        assert 0.95 <= row["bytes_ratio"] <= 1.05, row
        assert 0.5 <= row["time_ratio"] <= 2.0, row
