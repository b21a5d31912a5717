"""The volunteer's view over a real SQLite history: the leaderboard, progress, and display names from
presence records in a real DHT."""

from __future__ import annotations

import re

import pytest
from conftest import PEERS, T0
from fastapi.testclient import TestClient
from procs import Procs, free_port, wait_for
from test_address import get_json, init_tiny_run, start_coordinator

from coordinator.api import ApiContext, create_app
from coordinator.history import History, HistoryReader
from coordinator.liveness import Liveness
from nord.checks import fingerprint
from nord.config import RoundConfig
from nord.errors import ConfigError
from nord.transport import Transport, TransportConfig

RUN_CONFIG = {"run_id": "board-test", "rounds": {"quorum": 3, "deadline_s": 300.0}}
ROUNDS = 8  # conftest.seed_history: round r opens at T0 + 60 r, seals 40 s later; round 8 is open
NOW = T0 + 60 * ROUNDS + 10
TOKENS = 40_960  # per contribution
WINDOW_S = 60 * (ROUNDS - 1) + 40  # round 0 opened .. round 7 sealed
SEALED_TOKENS = (4 * ROUNDS - 3) * TOKENS  # three of PEERS[3]'s were rejected


@pytest.fixture
def client(seeded):
    history, ckpt = seeded
    history.touch_peer(PEERS[0], at=NOW - 5)  # heard from 5 s ago: online; the others' last word is older
    history.touch_peer(PEERS[1], name="Ada Lovelace", at=NOW - 5)
    reader = HistoryReader(history.path)
    app = create_app(
        ApiContext(history=reader, run_config=RUN_CONFIG, checkpoint_dir=ckpt, model={}, clock=lambda: NOW)
    )
    with TestClient(app) as c:
        yield c
    reader.close()


def test_leaderboard_ranks_by_accepted_tokens_with_rates_and_reasons(client):
    board = client.get("/api/leaderboard").json()
    assert board["total"] == board["matches"] == 4 and board["online"] == 2
    rows = board["peers"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    # three peers tie on tokens and contributions and came at the same time: key order breaks the tie
    assert [r["peer"] for r in rows] == [*sorted(PEERS[:3]), PEERS[3]]
    flaky = rows[3]
    assert (flaky["tokens"], flaky["accepted"], flaky["rejected"]) == (5 * TOKENS, 5, 3)
    assert flaky["rejection_reasons"] == [
        {"reason": "loss rose by 0.81 nats on the held-out batch", "count": 3}
    ]
    assert flaky["tokens_per_s"] == pytest.approx(5 * TOKENS / WINDOW_S)
    assert flaky["short"] == fingerprint(PEERS[3]) and flaky["device"] == "mps" and not flaky["online"]
    steady = rows[0]
    assert steady["tokens"] == ROUNDS * TOKENS and steady["rejection_reasons"] == []
    assert steady["tokens_per_s"] == pytest.approx(ROUNDS * TOKENS / WINDOW_S)
    assert board["rate_window"] == {"first_round": 0, "last_round": ROUNDS - 1, "seconds": WINDOW_S}


def test_leaderboard_finds_a_row_by_name_or_key_prefix_and_keeps_its_rank(client):
    ranks = {r["peer"]: r["rank"] for r in client.get("/api/leaderboard").json()["peers"]}
    (ada,) = client.get("/api/leaderboard", params={"q": "ada"}).json()["peers"]
    assert (ada["peer"], ada["name"], ada["rank"]) == (PEERS[1], "Ada Lovelace", ranks[PEERS[1]])
    by_key = client.get("/api/leaderboard", params={"q": fingerprint(PEERS[2]).upper()}).json()
    assert [r["peer"] for r in by_key["peers"]] == [PEERS[2]] and by_key["matches"] == 1
    assert client.get("/api/leaderboard", params={"q": "%"}).json()["peers"] == []  # literal, no wildcard
    page = client.get("/api/leaderboard", params={"limit": 2, "offset": 2}).json()
    assert [r["rank"] for r in page["peers"]] == [3, 4]


@pytest.mark.parametrize(
    "params, status",
    [
        ({"limit": 0}, 422),
        ({"limit": 1001}, 422),
        ({"offset": -1}, 422),
        ({"q": "x" * 65}, 422),
        ({"q": "a\nb"}, 422),
        ({"limit": "ten"}, 422),
        ({"page": 2}, 400),
    ],
    ids=["limit-0", "limit-1001", "offset-neg", "q-long", "q-newline", "limit-text", "unknown-param"],
)
def test_leaderboard_refuses_bad_parameters_with_json(client, params, status):
    r = client.get("/api/leaderboard", params=params)
    assert r.status_code == status and r.json()["error"]


def test_progress_reports_open_round_rates_and_contributors_per_round(client):
    p = client.get("/api/progress").json()
    assert p["open_round"] == {
        "round": ROUNDS,
        "opened_at": T0 + 60 * ROUNDS,
        "deadline_at": T0 + 60 * ROUNDS + 300.0,
        "quorum": 3,
        "pooled": 0,
        "rejected": 0,
        "quorum_fill": 0.0,
    }
    assert p["tokens_seen"] == SEALED_TOKENS and p["sealed_rounds"] == ROUNDS and p["target"] is None
    assert p["tokens_per_s"] == pytest.approx(SEALED_TOKENS / WINDOW_S)
    assert [r["round"] for r in p["rounds"]] == list(range(ROUNDS + 1))
    assert [r["contributors"] for r in p["rounds"]] == [4] * ROUNDS + [0]
    assert p["rounds"][1]["accepted"] == 3 and p["rounds"][1]["sealed_at"] == T0 + 60 + 40
    assert p["rounds"][0]["val_loss"] == pytest.approx(9.5) and p["rounds"][-1]["val_loss"] is None
    assert [r["round"] for r in client.get("/api/progress?rounds=2").json()["rounds"]] == [ROUNDS - 1, ROUNDS]
    assert client.get("/api/progress?rounds=0").status_code == 422
    assert client.get("/api/progress?round=1").status_code == 400


def test_each_seal_records_the_peers_online_then_contributing_or_not(seeded):
    """A peer heard from (its presence record) but sending nothing counts online in the seal's sample;
    a peer last heard more than the window before the seal does not."""
    history, ckpt = seeded
    seal_at = NOW + 30
    lurker = "ee" * 32  # heard from, never contributes
    history.touch_peer(lurker, mode="client", device="cpu", at=seal_at - 50)
    history.record_contribution("ab" * 32, round=ROUNDS, peer=PEERS[0], nbytes=1, tokens=1, at=seal_at - 5)
    history.mark_sealed(["ab" * 32], ROUNDS)
    history.seal_round(ROUNDS, weights_hash="cd" * 32, reason="deadline", metrics={}, at=seal_at)
    history.open_round(ROUNDS + 1, base_hash="cd" * 32, at=seal_at)
    reader = HistoryReader(history.path)
    app = create_app(
        ApiContext(history=reader, run_config=RUN_CONFIG, checkpoint_dir=ckpt, model={}, clock=lambda: NOW)
    )
    with TestClient(app) as c:
        progress = c.get("/api/progress").json()["rounds"]
        rounds = c.get("/api/rounds").json()
        metrics = c.get("/api/metrics").json()
        documented = c.get("/api/openapi.json").json()["paths"]
    reader.close()
    for path in ("/api/rounds", "/api/metrics", "/api/progress"):
        assert "`peers_online`" in documented[path]["get"]["description"], path
    # PEERS[1..3] last contributed in round 7, more than 60 s before this seal: offline at it
    assert [(r["round"], r["contributors"], r["peers_online"]) for r in progress[-3:]] == [
        (ROUNDS - 1, 4, 4),
        (ROUNDS, 1, 2),
        (ROUNDS + 1, 0, None),
    ]
    assert [r["peers_online"] for r in rounds] == [4] * ROUNDS + [2, None]
    assert [m["peers_online"] for m in metrics] == [4] * ROUNDS + [2]


@pytest.mark.parametrize(
    "target, unit, goal",
    [
        ({"target_tokens": 2 * SEALED_TOKENS}, "tokens", 2 * SEALED_TOKENS),
        ({"target_rounds": 16}, "rounds", 16),
    ],
    ids=["tokens", "rounds"],
)
def test_progress_target_is_half_done_with_an_eta_at_the_recent_pace(seeded, target, unit, goal):
    history, ckpt = seeded
    config = {**RUN_CONFIG, "rounds": {**RUN_CONFIG["rounds"], **target}}
    reader = HistoryReader(history.path)
    app = create_app(
        ApiContext(history=reader, run_config=config, checkpoint_dir=ckpt, model={}, clock=lambda: NOW)
    )
    with TestClient(app) as c:
        got = c.get("/api/progress").json()["target"]
    reader.close()
    # half the goal is done in WINDOW_S seconds, so the other half takes as long again
    assert got == {
        "unit": unit,
        "goal": goal,
        "done": goal // 2,
        "fraction": 0.5,
        "eta_s": pytest.approx(WINDOW_S),
        "eta_at": pytest.approx(NOW + WINDOW_S),
    }


@pytest.mark.parametrize(
    "fields", [{"target_rounds": 1, "target_tokens": 1}, {"target_rounds": -1}, {"target_tokens": 1.5}]
)
def test_run_config_refuses_two_targets_or_a_bad_one(fields):
    with pytest.raises(ConfigError, match="target"):
        RoundConfig(**fields)


def test_progress_counts_pooled_contributions_against_the_quorum(seeded):
    history, ckpt = seeded
    for i, peer in enumerate(PEERS[:2]):
        history.record_contribution(f"{i:064x}", round=ROUNDS, peer=peer, nbytes=1, tokens=1, at=NOW)
    reader = HistoryReader(history.path)
    app = create_app(ApiContext(history=reader, run_config=RUN_CONFIG, checkpoint_dir=ckpt, model={}))
    with TestClient(app) as c:
        open_round = c.get("/api/progress").json()["open_round"]
    reader.close()
    assert (open_round["pooled"], open_round["quorum_fill"]) == (2, pytest.approx(2 / 3))


@pytest.mark.p2p
@pytest.mark.timeout(120)
def test_presence_names_reach_the_leaderboard_only_when_valid(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    good, control, long = "ab" * 32, "cd" * 32, "ef" * 32
    transport = Transport.start(TransportConfig(local_only=True))
    try:
        key = "nord/names-test/peers"
        transport.store_record(key, "QmGood", {"key": good, "name": "Grace 🚀"}, 60)
        transport.store_record(key, "QmControl", {"key": control, "name": "evil\x1b[2J"}, 60)
        transport.store_record(key, "QmLong", {"key": long, "name": "x" * 33}, 60)
        assert Liveness(history).sync_presence(transport, "names-test") == 3
    finally:
        transport.shutdown()
    reader = HistoryReader(history.path)
    app = create_app(ApiContext(history=reader, run_config=RUN_CONFIG, checkpoint_dir=tmp_path, model={}))
    with TestClient(app) as c:
        names = {r["peer"]: r["name"] for r in c.get("/api/leaderboard").json()["peers"]}
    reader.close()
    history.close()
    assert names == {good: "Grace 🚀", control: None, long: None}


@pytest.mark.p2p
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_named_volunteer_finds_its_row_with_tokens_and_hears_its_verdict(tmp_path):
    http = free_port()
    with Procs(tmp_path, env={"NORD_DATA_DIR": str(tmp_path / "data")}) as procs:
        run_json = init_tiny_run(
            procs, tmp_path, "named", "--quorum", "1", "--deadline", "30", "--inner-steps", "2",
            "--batch-size", "2", "--seq-len", "32",
        )  # fmt: skip
        coordinator, summary = start_coordinator(procs, "coordinator", run_json, tmp_path / "coord", http)
        worker = procs.start(
            "worker", "join", "--run", "named", "--initial-peers", summary["multiaddrs"][0], "--state-dir",
            str(tmp_path / "w"), "--poll-s", "0.3", "--no-progress", "--local-only", "--device", "cpu",
            "--name", "Grace Hopper", "--max-rounds", "1", module="node",
        )  # fmt: skip
        assert worker.wait(timeout=600) == 0, procs.log("worker")
        rows = wait_for(
            lambda: [r for r in get_json(http, "/api/leaderboard?q=grace")["peers"] if r["tokens"] > 0],
            120,
            "the volunteer's row with its tokens",
        )
        procs.stop()
        assert coordinator.returncode == 0, procs.log("coordinator")
        log, coordinator_log = procs.log("worker", tail=20_000), procs.log("coordinator", tail=20_000)
    # one log format (hivemind's own "[INFO] ..." lines are gone), no ERROR lines from a clean stop
    assert not re.search(r"\[(DEBUG|INFO|WARN|WARNING|ERROR)\]", log + coordinator_log)
    assert "ERROR" not in log + coordinator_log
    (row,) = rows
    assert row["name"] == "Grace Hopper" and row["rank"] == 1 and row["accepted"] == 1
    assert f"as peer {row['short']} (Grace Hopper)" in log
    assert re.search(r"round 0 \| contribution accepted \|", log), log
