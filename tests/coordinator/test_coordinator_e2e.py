"""A real run on 127.0.0.1: `nord-coordinator serve` with two `nord-node join` workers (tiny recipe).

The browser test opens the dashboard in Debian's Chromium and checks that peers and charts render (and
saves a screenshot); the restart test kills the coordinator with SIGKILL, restarts it on the same state
dir and port, and checks that rounds, checkpoints and hashes are unchanged and the workers carry on.
Every process is stopped at the end and no p2pd may outlive the test.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from procs import Procs, free_port, wait_for

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(900)]

RUN = "e2e-coord"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
MIN_ROUNDS = int(os.environ.get("NORD_E2E_ROUNDS", "2"))  # sealed rounds before the dashboard is checked


class Run(Procs):
    """The coordinator and workers of the test, each in its own process group; records every p2pd."""

    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "data"
        super().__init__(tmp, env={"NORD_DATA_DIR": str(self.data)})
        self.tmp = tmp
        self.http_port, self.p2p_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.state = tmp / "coord"
        self.coordinator: subprocess.Popen | None = None
        self.maddr = ""

    def spawn(self, name: str, module: str, *args: str) -> subprocess.Popen:
        return self.start(name, *args, module=module)

    def start_coordinator(self) -> None:
        self.coordinator = self.spawn(
            "coordinator", "coordinator", "serve", "--run-config", str(self.tmp / "run.json"),
            "--state-dir", str(self.state), "--http", f"127.0.0.1:{self.http_port}",
            "--host-maddrs", f"/ip4/127.0.0.1/tcp/{self.p2p_port}", "--local-only", "--val-batches", "1",
        )  # fmt: skip
        wait_for(lambda: self.coordinator.poll() is not None or self.get("/api/summary"), 300, "the API")
        assert self.coordinator.poll() is None, self.log("coordinator")
        self.record_daemon(self.coordinator)
        self.maddr = self.get("/api/summary")["multiaddrs"][0]

    def join(self, name: str) -> subprocess.Popen:
        return self.spawn(
            name, "node", "join", "--run", RUN, "--initial-peers", self.maddr, "--state-dir",
            str(self.tmp / name), "--poll-s", "0.3", "--no-progress", "--local-only", "--device", "cpu",
        )  # fmt: skip

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def sealed(self) -> list[dict]:
        return [r for r in self.get("/api/rounds") if r["sealed_at"] is not None]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coord-e2e")
    rng = random.Random(0)
    words = "thou art the sun and moon of spring that walks upon green hills where rivers sing".split()
    (tmp / "text.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(80))
    )
    with Run(tmp) as r:  # stops every process group on the way out, however the tests end
        init = r.spawn(
            "init", "coordinator", "init", "--run", RUN, "--model", "tiny", "--source", str(tmp / "text.txt"),
            "--vocab-size", "512", "--quorum", "2", "--deadline", "20", "--inner-steps", "2", "--batch-size",
            "2", "--seq-len", "32", "--keep-checkpoints", "3", "--out", str(tmp / "run.json"),
        )  # fmt: skip
        assert init.wait(timeout=300) == 0, r.log("init")
        r.start_coordinator()
        r.workers = [r.join("w0"), r.join("w1")]
        for worker in r.workers:
            r.record_daemon(worker)
        wait_for(lambda: len(r.sealed()) >= MIN_ROUNDS, 600, f"{MIN_ROUNDS} sealed rounds")
        yield r
        r.stop()
        r.assert_daemons_gone()
        assert r.coordinator.returncode == 0, "the coordinator did not stop cleanly on SIGTERM"


@pytest.mark.browser
def test_dashboard_shows_live_peers_and_charts(run, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: apt-get install -y --no-install-recommends chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900}, color_scheme="dark")
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(run.url + "/")
            page.wait_for_selector("#status[data-state=live]", timeout=120_000)
            page.wait_for_function(
                "document.querySelectorAll('#peers-table tbody tr[data-peer]').length >= 2", timeout=120_000
            )
            page.wait_for_function(
                "document.querySelectorAll('#chart-loss path.line').length === 1", timeout=120_000
            )
            summary = run.get("/api/summary")
            assert page.inner_text("#run-id") == RUN
            assert page.inner_text("#join-cmd") == summary["join_command"]
            assert page.inner_text("#s-model") == "tiny"
            assert len(page.query_selector_all("#chart-loss circle.dot")) >= MIN_ROUNDS
            assert len(page.query_selector_all("#chart-rates path.line")) == 4  # one line per layer
            assert len(page.query_selector_all("#chart-contrib rect.bar")) >= MIN_ROUNDS
            assert len(page.query_selector_all("#chart-bytes rect.bar")) >= MIN_ROUNDS
            # each seal recorded the peers online then (the sealed contributions' peers at least)
            assert page.locator("#chart-online path.line[data-series='peers online']").count() == 1
            assert all(m["peers_online"] >= 1 for m in run.get("/api/metrics"))
            assert page.query_selector_all("#ckpt-table a[href$='.safetensors']")
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            if os.environ.get("NORD_SCREENSHOT"):
                shutil.copy(shot, os.environ["NORD_SCREENSHOT"])
            assert errors == []
        finally:
            browser.close()


def test_coordinator_killed_and_restarted_resumes_and_workers_carry_on(run, tmp_path):
    sealed_before = run.sealed()
    ckpts_before = run.get("/api/checkpoints")
    latest = ckpts_before[-1]
    os.kill(run.coordinator.pid, signal.SIGKILL)
    run.coordinator.wait(timeout=60)
    run.start_coordinator()  # same state dir, same ports, same peer id
    after = {r["round"]: r for r in run.get("/api/rounds")}
    for r in sealed_before:
        assert after[r["round"]]["weights_hash"] == r["weights_hash"]
        assert after[r["round"]]["sealed_at"] == r["sealed_at"]
    ckpts_after = {c["round"]: c for c in run.get("/api/checkpoints")}
    assert ckpts_after[latest["round"]]["weights_hash"] == latest["weights_hash"]

    out = tmp_path / "latest.safetensors"  # the worker's `pull` against the restarted coordinator
    pull = subprocess.run([sys.executable, "-m", "node", "pull", "--from", run.url, "--out", str(out)],
                          env=run.env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pull.returncode == 0, pull.stdout + pull.stderr

    last = sealed_before[-1]["round"]
    wait_for(lambda: len(run.sealed()) > len(sealed_before), 400, "a new round sealed after the restart")
    newer = [r for r in run.sealed() if r["round"] > last]
    assert sum(r["accepted"] for r in newer) >= 1
    assert all(w.poll() is None for w in run.workers), "a worker died while the coordinator restarted"
