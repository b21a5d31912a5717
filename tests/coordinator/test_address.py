"""The coordinator keeps its P2P port (and peer id) across restarts, and says when it cannot be reached
from other networks."""

from __future__ import annotations

import json
import random
import urllib.request
from pathlib import Path

import pytest
from procs import Procs, free_port, wait_for

from coordinator.address import PORT_FILE, reach_note, scope, stable_host_maddrs
from nord.errors import ConfigError


def test_port_zero_becomes_the_state_dirs_port_and_stays(tmp_path):
    first = stable_host_maddrs(["/ip4/0.0.0.0/tcp/0"], tmp_path)
    port = int((tmp_path / PORT_FILE).read_text())
    assert first == (f"/ip4/0.0.0.0/tcp/{port}",) and 0 < port < 65536
    assert stable_host_maddrs(["/ip4/0.0.0.0/tcp/0", "/ip6/::/tcp/0"], tmp_path) == (
        f"/ip4/0.0.0.0/tcp/{port}",
        f"/ip6/::/tcp/{port}",
    )
    assert stable_host_maddrs(["/ip4/0.0.0.0/tcp/4100"], tmp_path) == ("/ip4/0.0.0.0/tcp/4100",)  # explicit
    (tmp_path / PORT_FILE).write_text("99999\n")
    with pytest.raises(ConfigError, match="not a TCP port"):
        stable_host_maddrs(["/ip4/127.0.0.1/tcp/0"], tmp_path)


@pytest.mark.parametrize(
    "maddr, where",
    [
        ("/ip4/127.0.0.1/tcp/1/p2p/QmX", "loopback"),
        ("/ip6/::1/tcp/1", "loopback"),
        ("/ip4/192.168.1.20/tcp/1", "private"),
        ("/ip4/10.1.2.3/tcp/1", "private"),
        ("/ip4/100.64.0.9/tcp/1", "private"),
        ("/ip6/fd00::1/tcp/1", "private"),
        ("/ip4/8.8.8.8/tcp/1", "public"),
        ("/dns4/nord.example.org/tcp/1", "public"),
    ],
)
def test_scope_of_an_address(maddr, where):
    assert scope(maddr) == where


def test_reach_note_warns_only_without_a_public_address():
    assert "only this machine can join" in reach_note(["/ip4/127.0.0.1/tcp/1"])
    assert "only this network can join" in reach_note(["/ip4/127.0.0.1/tcp/1", "/ip4/10.0.0.2/tcp/1"])
    assert reach_note(["/ip4/127.0.0.1/tcp/1", "/ip4/8.8.8.8/tcp/1"]) is None


def init_tiny_run(procs: Procs, tmp_path: Path, run_id: str, *flags: str) -> Path:
    """Write a small corpus and `nord-coordinator init` a tiny-model run on it; return its run.json."""
    rng = random.Random(0)
    words = "thou art the sun and moon of spring that walks upon green hills where rivers sing".split()
    (tmp_path / "text.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(60))
    )
    run_json = tmp_path / "run.json"
    init = procs.start(
        "init", "init", "--run", run_id, "--model", "tiny", "--source", str(tmp_path / "text.txt"),
        "--vocab-size", "512", "--out", str(run_json), *flags, module="coordinator",
    )  # fmt: skip
    assert init.wait(timeout=300) == 0, procs.log("init")
    return run_json


def start_coordinator(procs: Procs, name: str, run_json: Path, state_dir: Path, http: int):
    """`nord-coordinator serve` on loopback; its /api/summary once it answers."""
    coordinator = procs.start(
        name, "serve", "--run-config", str(run_json), "--state-dir", str(state_dir),
        "--http", f"127.0.0.1:{http}", "--local-only", "--val-batches", "1", module="coordinator",
    )  # fmt: skip
    summary = wait_for(lambda: coordinator.poll() is None and get_json(http, "/api/summary"), 300, "the API")
    return coordinator, summary


def get_json(port: int, path: str):
    """GET http://127.0.0.1:<port><path> as JSON; None while nothing answers there."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return json.loads(r.read())
    except OSError:
        return None


@pytest.mark.p2p
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_restarted_coordinator_announces_the_same_multiaddr(tmp_path):
    with Procs(tmp_path, env={"NORD_DATA_DIR": str(tmp_path / "data")}) as procs:
        run_json = init_tiny_run(procs, tmp_path, "port-test")
        announced = []
        for attempt in range(2):
            name = f"serve{attempt}"
            coordinator, summary = start_coordinator(procs, name, run_json, tmp_path / "coord", free_port())
            announced.append(summary["multiaddrs"])
            note = wait_for(
                lambda n=name: "warning:" in procs.log(n) and procs.log(n), 60, "the start-up note"
            )
            assert "only this machine can join" in note
            procs.stop()
            assert coordinator.returncode == 0, procs.log(name)
            procs.procs.clear()
    assert announced[0] == announced[1] and announced[0]
