"""Network partitions between real peers: the coordinator (`nord-coordinator serve`) and two workers, each
in a network namespace the test makes, joined by veth pairs to a bridge in a hub namespace (addresses in
10.231.0.0/24 inside those namespaces only; no namespace has a route anywhere else). A partition is the
hub's end of a peer's veth set down; healing sets it up.

1. The coordinator is cut off right after a seal: the workers train the open round; w0 (which relays,
   `--adopt contributions`) sends its contribution to w1, acknowledged by w1 only, while w1 (the default,
   `--adopt auto`) sends its own to the bootstrap peer only and reaches nobody; healed, the coordinator
   gets both (w0's via either worker, w1's by w1's next sync) and seals them.
2. A worker is cut off right after a seal: the round cannot reach its quorum of 2 until it is healed.

Then the same checks as the kill test (tests/swarm.py `ledger`): every acknowledged contribution sealed
exactly once, no round folding two of one peer, every replica on the last seal, no process left. Needs
root and `ip netns`; the namespaces are deleted afterwards, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess

import pytest
from procs import wait_for
from swarm import Swarm, assert_nothing_lost

from coordinator.history import History

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(1200)]

WORKERS = ["w0", "w1"]
SUBNET = "10.231.0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60, check=check)


def netns_unavailable() -> str:
    """Why this test cannot make network namespaces here ('' if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("curl"):
        return "needs `ip` (iproute2) and `curl`"
    probe = f"nordprobe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    ip("netns", "del", probe, check=False)
    return "" if made.returncode == 0 else f"`ip netns add` failed: {made.stderr.strip()}"


class Network:
    """A hub namespace with a bridge, and per member a namespace joined to it by a veth pair."""

    def __init__(self, members: list[str]) -> None:
        tag = os.getpid() % 100000
        self.hub = f"nordp{tag}-hub"
        self.namespaces: list[str] = []
        self.hub_end: dict[str, str] = {}
        self.members: dict[str, tuple[str, str]] = {}  # name -> (namespace, address)
        self.prefix, self.names = f"nordp{tag}", members

    def __enter__(self) -> Network:
        try:
            self._add(self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "link", "set", "br0", "up")
            for i, name in enumerate(self.names, 1):
                ns, outer, inner = f"{self.prefix}-{name}", f"nph{i}", f"npp{i}"
                self._add(ns)
                ip("-n", self.hub, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
                ip("-n", self.hub, "link", "set", outer, "master", "br0", "up")
                ip("-n", ns, "addr", "add", f"{SUBNET}.{i}/24", "dev", inner)
                ip("-n", ns, "link", "set", inner, "up")
                self.hub_end[name] = outer
                self.members[name] = (ns, f"{SUBNET}.{i}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", self.hub_end[name], "down")

    def heal(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", self.hub_end[name], "up")

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.namespaces):
            ip("netns", "del", ns, check=False)
        self.namespaces.clear()


def sent_for(log: str, rnd: int) -> list[int]:
    """Peers reached by each send of a contribution for round `rnd` in a worker's log."""
    pattern = rf"sent contribution [0-9a-f]{{12}} for round {rnd} \(\d+ bytes\) to (\d+) peer"
    return [int(n) for n in re.findall(pattern, log)]


def knows_seal(swarm: Swarm, name: str, open_round: int) -> bool:
    """`name` (a worker) has the seal before `open_round`: its status shows that round open."""
    return json.loads((swarm.tmp / name / "status.json").read_text()).get("open_round", -1) >= open_round


def partition(swarm: Swarm, net: Network, name: str, senders: list[str], held) -> int:
    """Cut `name` off once one more round is sealed and every worker has that seal (a worker cut before
    the seal's push reached it could not train the next round), then wait until each of `senders` has
    sent its contribution for the round left open; returns that round, still open, once `held(round)`
    says the sends went as the partition dictates. If a send beat the cut, heal and try the next round."""
    for _ in range(5):
        start = swarm.sealed_rounds()
        wait_for(lambda s=start: swarm.sealed_rounds() > s, 600, f"round {start} sealed")
        open_round = swarm.sealed_rounds()
        for n in WORKERS:
            knows = lambda n=n, r=open_round: knows_seal(swarm, n, r)  # noqa: E731
            wait_for(knows, 600, f"{n} has the seal of round {open_round - 1}")
        net.cut(name)
        if swarm.sealed_rounds() != open_round:  # already sealed again before the cut
            net.heal(name)
            continue
        for n in senders:
            sent = lambda n=n, r=open_round: sent_for(swarm.log(n, tail=10**7), r)  # noqa: E731
            wait_for(sent, 600, f"{n} sent its contribution for round {open_round}")
        if swarm.sealed_rounds() == open_round and held(open_round):
            return open_round
        net.heal(name)
    raise AssertionError(f"the sends beat the cut of {name} five times")


def test_partitions_heal_with_every_acknowledged_contribution_sealed_once(tmp_path):
    if why := netns_unavailable():
        pytest.skip(why)
    with Network(["coord", *WORKERS]) as net, Swarm(tmp_path, netns=net.members) as swarm:
        swarm.init()
        swarm.start_coordinator()
        swarm.join("w0", "--adopt", "contributions")  # relays: sends to every peer, w1 included
        swarm.join("w1")  # the default: sends its own contribution to the bootstrap peer only
        wait_for(lambda: swarm.sealed_rounds() >= 1, 600, "a first round sealed across the namespaces")

        # 1: the coordinator cut off; w1 holds w0's contribution, w1's own reached nobody
        def cut_off_as_planned(r: int) -> bool:
            w0, w1 = (sent_for(swarm.log(n, tail=10**7), r) for n in WORKERS)
            return max(w0) >= 1 and max(w1) == 0

        open_round = partition(swarm, net, "coord", WORKERS, cut_off_as_planned)
        sent = rf"sent contribution ([0-9a-f]{{12}}) for round {open_round} "
        unacknowledged = re.findall(sent, swarm.log("w1", tail=10**7))  # w1's, which reached nobody
        net.heal("coord")
        wait_for(lambda: swarm.sealed_rounds() > open_round, 600, f"round {open_round} sealed after healing")

        # 2: a worker cut off; the quorum of 2 cannot be met without it
        def w1_cut_off(r: int) -> bool:  # w1 trained and sent while cut off: it reached nobody
            return max(sent_for(swarm.log("w1", tail=10**7), r)) == 0

        open_round = partition(swarm, net, "w1", ["w1"], w1_cut_off)
        net.heal("w1")
        wait_for(lambda: swarm.sealed_rounds() > open_round, 600, f"round {open_round} sealed after healing")

        swarm.finish_workers(WORKERS)
        final = swarm.get("/api/summary")
        swarm.stop()
        assert swarm.running["coord"].returncode == 0, swarm.log("coord")
        swarm.assert_daemons_gone()
        assert not swarm.leftovers()

    assert_nothing_lost(swarm, WORKERS, final)
    history = History.open(swarm.tmp / "coord" / "history.sqlite")  # w1's waited, then was sealed
    try:
        rows = [r for r in history.contributions() if r["id"][:12] in set(unacknowledged)]
        assert len(rows) == 1 and rows[0]["sealed_in"] is not None, rows
    finally:
        history.close()
    with contextlib.suppress(FileNotFoundError):
        assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(net.prefix)]
