"""Chaos on 127.0.0.1: the real coordinator (`nord-coordinator serve`, its `Authority`) and two workers,
SIGKILLed at random moments (training, sending, sealing, writing a checkpoint: wherever the kill lands)
and restarted on the same state dirs and ports.

Phase 1 kills and restarts at random (seeded: NORD_CHAOS_SEED) while rounds go on; phase 2 stops both
workers cleanly and runs each for one more round, so that every replica must end on one sealed round.
Checks: every contribution a worker saw acknowledged (pushed to at least one peer) is in the coordinator's
history exactly once and sealed into exactly one round; no round folds two contributions of one peer;
every replica (on disk) ends on the coordinator's last sealed weights; no worker, coordinator or p2pd is left.
The longer randomised run is `nord bench chaos` (bench/chaos.py), on the same `swarm` helpers.
"""

from __future__ import annotations

import os
import random

import pytest
from swarm import Swarm, assert_nothing_lost

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(1200)]

WORKERS = ["w0", "w1"]
KILLS = 3
SEED = int(os.environ.get("NORD_CHAOS_SEED", "0"))


def test_sigkill_at_random_moments_loses_nothing_and_leaves_nothing(tmp_path):
    rng = random.Random(SEED)
    with Swarm(tmp_path) as swarm:
        swarm.init()
        swarm.start_coordinator()
        for name in WORKERS:
            swarm.join(name)

        # phase 1: a victim per kill, at a random moment once the swarm is making progress again
        for victim in [rng.choice(("coord", *WORKERS)) for _ in range(KILLS)]:
            kill = swarm.kill_at_random_moment(victim, rng, max_delay_s=4.0)
            assert not kill["p2pd_left"], f"the p2pd of SIGKILLed {victim} outlived it: {kill}"

        # phase 2: stop the workers cleanly, then one more round each: every replica ends on its seal
        swarm.finish_workers(WORKERS)
        final = swarm.get("/api/summary")
        swarm.stop()
        assert swarm.running["coord"].returncode == 0, swarm.log("coord")
        swarm.assert_daemons_gone()
        assert all(p.poll() is not None for p in swarm.procs)

    assert_nothing_lost(swarm, WORKERS, final)
