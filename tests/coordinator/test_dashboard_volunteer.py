"""The volunteer's view in Debian's Chromium: the leaderboard, the open round's progress, the charts' text
alternatives and the phone layout, served by the real API over a real SQLite history.

Screenshots go to $NORD_SCREENSHOT_DIR when set (docs/dashboard.png and docs/dashboard-phone.png come from
`NORD_SCREENSHOT_DIR=docs python -m pytest tests/coordinator/test_dashboard_volunteer.py`), else to the
test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import uvicorn
from conftest import PEERS, T0
from procs import free_port, wait_for

from coordinator.api import ApiContext, create_app
from coordinator.history import HistoryReader
from nord.checks import fingerprint

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
RUN_CONFIG = {"run_id": "volunteer-view", "rounds": {"quorum": 3, "deadline_s": 300.0, "target_rounds": 64}}
ROUNDS = 8  # conftest.seed_history: round r opens at T0 + 60 r and seals 40 s later; round 8 is open
MADDR = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
AUTHORITY = "7f" * 32
ROWS = "document.querySelectorAll('#peers-table tr[data-peer]')"  # the leaderboard's rows, in JS
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}


class Dashboard:
    """The coordinator's app over `history`, served by uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, history, checkpoint_dir: Path):
        started = time.time()
        self.clock = lambda: T0 + 60 * ROUNDS + 10 + (time.time() - started)  # 10 s into round 8
        self.reader = HistoryReader(history.path)
        app = create_app(
            ApiContext(
                history=self.reader,
                run_config=RUN_CONFIG,
                checkpoint_dir=checkpoint_dir,
                model={"name": "tiny", "parameters": 1_022_208, "layers": 4},
                live=lambda: {"multiaddrs": [MADDR], "authority": AUTHORITY},
                clock=self.clock,
            )
        )
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 60, "the dashboard's server")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.reader.close()


@pytest.fixture
def dashboard(seeded):
    history, ckpt = seeded
    history.touch_peer(PEERS[1], name="Ada Lovelace")
    for i, peer in enumerate(PEERS[:2]):  # two of the quorum's three arrived in the open round
        history.record_contribution(
            f"{i:064x}", round=ROUNDS, peer=peer, nbytes=1, tokens=1, at=T0 + 60 * ROUNDS + 5
        )
    d = Dashboard(history, ckpt)
    d.history = history
    yield d
    d.close()


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: apt-get install -y --no-install-recommends chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_page(browser, dashboard, viewport):
    page = browser.new_page(viewport=viewport, color_scheme="dark")
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(dashboard.url + "/")
    page.wait_for_selector("#status[data-state=live]", timeout=60_000)
    page.wait_for_function(f"{ROWS}.length === 4", timeout=60_000)
    return page


def screenshot(page, name: str, tmp_path: Path, *, full_page: bool) -> None:
    out = Path(os.environ.get("NORD_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / name), full_page=full_page)


def test_polling_fetches_the_per_round_metrics_once_per_seal(browser, dashboard):
    """/api/metrics is the heaviest read at long histories: between seals the page reuses it."""
    page = browser.new_page(viewport=DESKTOP)
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url.split("?")[0].rsplit("/", 1)[-1]))
    page.goto(dashboard.url + "/")
    page.wait_for_selector("#status[data-state=live]", timeout=60_000)
    deadline = time.monotonic() + 120
    while asked.count("summary") < 3 and time.monotonic() < deadline:  # three polls, no seal in between
        page.wait_for_timeout(500)
    assert asked.count("summary") >= 3
    assert asked.count("metrics") == 1 and asked.count("checkpoints") == 1, asked


def test_leaderboard_ranks_contributors_and_finds_a_volunteer_by_name_or_id(browser, dashboard, tmp_path):
    page = open_page(browser, dashboard, DESKTOP)
    board = dashboard.get("/api/leaderboard")["peers"]
    rows = page.query_selector_all("#peers-table tr[data-peer]")
    assert [r.get_attribute("data-peer") for r in rows] == [p["peer"] for p in board]
    assert [r.query_selector(".rank").inner_text() for r in rows] == ["#1", "#2", "#3", "#4"]
    flaky = page.query_selector(f"#peers-table tr[data-peer='{PEERS[3]}']")
    assert "loss rose by 0.81 nats on the held-out batch (×3)" in flaky.inner_text()
    assert flaky.query_selector("code").inner_text() == fingerprint(PEERS[3])
    rate = next(p for p in board if p["peer"] == PEERS[3])["tokens_per_s"]
    assert f"{rate:.0f}" in flaky.inner_text().replace(",", "")  # tokens/s shown (under 1000: no k)

    ada_rank = next(p["rank"] for p in board if p["peer"] == PEERS[1])
    page.fill("#board-q", "ada")
    page.wait_for_function(f"{ROWS}.length === 1")
    row = page.query_selector("#peers-table tr[data-peer]")
    assert row.get_attribute("data-peer") == PEERS[1] and "match" in row.get_attribute("class")
    assert "Ada Lovelace" in row.inner_text() and f"#{ada_rank}" in row.inner_text()

    only_third = f"{ROWS}.length === 1 && {ROWS}[0].dataset.peer === '{PEERS[2]}'"
    page.fill("#board-q", fingerprint(PEERS[2])[:10])
    page.wait_for_function(only_third)
    page.reload()  # the search is remembered: the volunteer's row is found again on the next visit
    page.wait_for_function(only_third)
    page.fill("#board-q", "")
    page.wait_for_function(f"{ROWS}.length === 4")
    assert page.errors == []


def test_progress_charts_and_accessibility(browser, dashboard, tmp_path):
    page = open_page(browser, dashboard, DESKTOP)
    assert len(page.query_selector_all("h1")) == 1
    assert page.inner_text("#p-quorum-text") == "2 of 3 contributions pooled (66.7%)"
    assert page.get_attribute("#p-quorum", "aria-valuetext") == "2 of 3 contributions"
    assert re.fullmatch(r"4:[45]\d", page.inner_text("#p-deadline"))  # 300 s deadline, 10 s into the round
    assert page.inner_text("#p-rate").endswith("tok/s")
    # 8 of 64 rounds sealed in 460 s: the other 56 take 56 × 57.5 s = 53.7 min at that pace
    assert page.inner_text("#p-target-text").startswith("8 of 64 rounds (12.5%) · ETA 54 min (")
    # the join command is honest about a loopback-only coordinator
    assert page.inner_text("#join-hint") == "on this machine only"
    assert "loopback" in page.inner_text("#join-warn") and page.is_visible("#join-warn")
    # every chart says what it shows in words, with its latest value; axes have titles
    loss = page.get_attribute("#chart-loss svg", "aria-label")
    last_loss = dashboard.get("/api/metrics")[-1]["val_loss"]
    assert f"latest: validation loss {last_loss:.2f} at round {ROUNDS - 1}" in loss
    # peers online (heard within 60 s) beside peers contributing, both sampled at each seal
    for series in ("peers online", "peers contributing"):  # flat lines here: drawn, with no height
        assert page.locator(f"#chart-online path.line[data-series='{series}']").count() == 1
    latest = f"latest: peers online 4 at round {ROUNDS - 1}; peers contributing 4 at round {ROUNDS - 1}"
    assert latest in page.get_attribute("#chart-online svg", "aria-label")
    assert page.inner_text("#legend-online").split() == ["peers", "online", "peers", "contributing"]
    assert page.text_content("#chart-loss .axis .title >> nth=0") == "time (local)"
    page.click("button[data-x=round]")
    page.wait_for_function("document.querySelector('#chart-loss .axis .title').textContent === 'round'")
    ticks = [t.text_content() for t in page.query_selector_all("#chart-loss .axis text.xtick")]
    assert ticks == ["r0", "r2", "r4", "r6"]  # a regular step, not r0 r2 r3 r5
    assert page.evaluate("fmtPct(0.125)") == "12.5%"
    # API docs without a CDN; each checkpoint shows its pull command
    api = page.get_attribute("footer a[href^='/api']", "href")
    assert api == "/api/openapi.json" and "/api/leaderboard" in dashboard.get(api)["paths"]
    pull = page.inner_text(f"#ckpt-table li[data-round='{ROUNDS}'] code.wrap >> nth=0")
    assert pull == (
        f"nord-node pull --from {dashboard.url}/checkpoints/{ROUNDS}.safetensors "
        f"--authority {fingerprint(AUTHORITY)} --out volunteer-view-r{ROUNDS}.safetensors"
    )
    page.click("button[data-x=time]")
    page.evaluate("scrollTo(0, 0)")
    screenshot(page, "dashboard.png", tmp_path, full_page=True)
    # a sealed round is announced to screen readers; PEERS[2], heard from but not contributing, counts
    # online at the seal (PEERS[0] and PEERS[1] sent round 8's two contributions)
    history, now = dashboard.history, dashboard.clock()
    history.touch_peer(PEERS[2], at=now)
    history.seal_round(ROUNDS, weights_hash="ab" * 32, reason="deadline", metrics={"val_loss": 3.0}, at=now)
    history.open_round(ROUNDS + 1, base_hash="ab" * 32, at=now)
    page.wait_for_function(
        f"document.querySelector('#round-announcer').textContent.includes('round {ROUNDS + 1} is open')",
        timeout=60_000,
    )
    assert page.get_attribute("#round-announcer", "aria-live") == "polite"
    sealed = f"peers online 3 at round {ROUNDS}; peers contributing 2 at round {ROUNDS}"
    page.wait_for_function(
        f"document.querySelector('#chart-online svg').getAttribute('aria-label').includes('{sealed}')",
        timeout=60_000,
    )
    assert page.errors == []


def test_phone_layout_keeps_everything_inside_390_px(browser, dashboard, tmp_path):
    page = open_page(browser, dashboard, PHONE)
    page.wait_for_selector("#chart-loss path.line")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    for selector in ("#join-cmd", "#copy-join", "#s-hash"):
        box = page.query_selector(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
    # the full weights hash is on the page (and copyable), not only in a tooltip
    latest = dashboard.get("/api/summary")["weights_hash"]
    assert page.inner_text("#s-hash") == latest
    # leaderboard rows become cards: tokens, accepted and bytes stay visible on screen
    row = page.query_selector(f"#peers-table tr[data-peer='{PEERS[0]}']")
    for label in ("Tokens", "Accepted", "Bytes"):
        cell = row.query_selector(f"td[data-label='{label}']")
        box = cell.bounding_box()
        assert cell.is_visible() and box["x"] + box["width"] <= PHONE["width"], label
    link = page.query_selector("#ckpt-table a[href$='.safetensors']")
    assert link.bounding_box()["x"] + link.bounding_box()["width"] <= PHONE["width"]
    page.evaluate("document.querySelector('section.join').scrollIntoView()")
    screenshot(page, "dashboard-phone.png", tmp_path, full_page=False)  # one screen: join, then contributors
    assert page.errors == []
