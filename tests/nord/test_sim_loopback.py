"""The simulator against the real swarm: bench/gossip.py's spread on 127.0.0.1 (real hivemind, real
Gossip, real replicas), N = 4, 8, 16, beside `nord.sim.loopback.spread` fed with what this machine
measured in the same run (stream rate, small-request time, cores) and the fitted merge cost.

Tolerances (docs/simulation.md, "Validation"): bytes the author sends within 1% (the simulator counts
the envelope plus 64 bytes per push; framing and msgpack add ~100 bytes to a 29 kB envelope); the time
until every peer holds it within a factor of 4 of the range of the real swarm's three runs in the same
call (from a quarter of the fastest to four times the slowest). The benchmark reports the 2x agreement;
the test allows 4x because it must pass on a loaded machine, where the real medians themselves moved 2.8x
between two calls ten minutes apart (N = 8: 0.224 and 0.637 s).
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
    out = bench.validate([4, 8, 16], repeats=3)
    for row in out["rows"]:
        assert 0.99 <= row["bytes_ratio"] <= 1.01, row
        assert min(row["real_runs_s"]) / 4 <= row["sim_s"] <= 4 * max(row["real_runs_s"]), row
