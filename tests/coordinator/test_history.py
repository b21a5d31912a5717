"""The run history in SQLite: what the dashboard shows and what a restart resumes from."""

from __future__ import annotations

import hashlib
import sqlite3

from conftest import PEERS, T0, seed_history

from coordinator.history import ONLINE_WINDOW_S, History
from coordinator.history_schema import SCHEMA_VERSION


def test_history_survives_reopen_with_every_round_and_checkpoint(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    seed_history(history, tmp_path)
    before = (
        history.rounds(),
        history.peers(),
        history.metrics(),
        history.checkpoints(),
        history.revocations(),
    )
    history.close()
    again = History.open(tmp_path / "h.sqlite")
    assert (
        again.rounds(),
        again.peers(),
        again.metrics(),
        again.checkpoints(),
        again.revocations(),
    ) == before
    assert again.current_round()["round"] == 8 and again.current_round()["sealed_at"] is None
    again.close()


def test_history_uses_wal_journal(tmp_path):
    History.open(tmp_path / "h.sqlite").close()
    mode = sqlite3.connect(tmp_path / "h.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_contribution_is_recorded_once_and_counted_per_peer(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    history.open_round(0, base_hash="00" * 32, at=1.0)
    assert history.record_contribution("c1", round=0, peer=PEERS[0], nbytes=100, tokens=10, at=2.0)
    assert not history.record_contribution("c1", round=0, peer=PEERS[0], nbytes=100, tokens=10, at=3.0)
    history.record_contribution("c2", round=0, peer=PEERS[0], nbytes=50, tokens=10, at=4.0)
    history.set_verdict(
        "c2", "rejected", reason="held-out loss rose", loss_before=5.0, loss_after=float("nan")
    )
    history.record_revocation("c2", reason="held-out loss rose", by="validator", at=5.0)
    history.mark_sealed(["c1"], 0)
    (peer,) = history.peers()
    assert (peer["accepted"], peer["rejected"], peer["bytes"], peer["tokens"]) == (1, 1, 150, 10)
    assert history.contribution("c2")["loss_after"] is None  # NaN is stored as "unknown", never as NaN
    assert history.revocations()[0]["peer"] == PEERS[0] and history.revocations()[0]["round"] == 0
    assert history.tokens_seen() == 10
    history.close()


def test_contribution_counts_in_the_round_that_sealed_it(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    history.open_round(0, base_hash="00" * 32, at=1.0)
    history.record_contribution("late", round=0, peer=PEERS[1], nbytes=70, tokens=5, at=2.0)
    history.seal_round(0, weights_hash="11" * 32, reason="deadline", metrics={"val_loss": 3.0})
    history.open_round(1, base_hash="11" * 32, at=3.0)
    history.mark_sealed(["late"], 1)  # arrived after round 0's seal, folded into round 1
    rounds = {r["round"]: r for r in history.rounds()}
    assert (rounds[0]["accepted"], rounds[0]["bytes"]) == (0, 0)
    assert (rounds[1]["accepted"], rounds[1]["bytes"], rounds[1]["tokens"]) == (1, 70, 5)
    assert history.metrics() == {0: {"val_loss": 3.0}}
    history.close()


def test_ban_is_remembered(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    history.ban(PEERS[2], reason="3 contributions rejected", by="validator")
    assert history.is_banned(PEERS[2]) and not history.is_banned(PEERS[1])
    assert history.peers()[0]["ban_reason"] == "3 contributions rejected"
    history.close()


def test_a_known_contribution_does_not_touch_its_peer_again(tmp_path):
    """The authority sees held contributions again and again: only the first sighting is hearing from it."""
    history = History.open(tmp_path / "h.sqlite")
    history.open_round(0, base_hash="00" * 32, at=1.0)
    history.record_contribution("c1", round=0, peer=PEERS[0], nbytes=100, tokens=10, at=100.0)
    for later in (200.0, 300.0, 400.0):
        history.record_contribution("c1", round=0, peer=PEERS[0], nbytes=100, tokens=10, at=later)
    (peer,) = history.peers()
    assert (peer["first_seen"], peer["last_seen"]) == (100.0, 100.0)
    history.close()


def test_rounds_are_paged_newest_last(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    seed_history(history, tmp_path)
    assert [r["round"] for r in history.rounds(limit=3)] == [6, 7, 8]
    assert [r["round"] for r in history.rounds(before=6, limit=3)] == [3, 4, 5]
    assert [r["round"] for r in history.rounds(before=2, limit=3)] == [0, 1]
    assert [r["round"] for r in history.rounds(limit=3, sealed_only=True)] == [5, 6, 7]
    assert history.round(4) == history.rounds()[4] and history.round(99) is None
    assert history.sealed_rounds() == (8, history.round(7)["weights_hash"])
    history.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE peers (
    peer TEXT PRIMARY KEY, mode TEXT, device TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, opened_at REAL NOT NULL, sealed_at REAL, seal_reason TEXT,
    weights_hash TEXT, base_hash TEXT);
CREATE TABLE contributions (
    id TEXT PRIMARY KEY, round INTEGER NOT NULL, peer TEXT NOT NULL, received_at REAL NOT NULL,
    bytes INTEGER NOT NULL, tokens INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    reason TEXT, loss_before REAL, loss_after REAL, norm REAL, sealed_in INTEGER);
CREATE INDEX contributions_round ON contributions(round);
CREATE INDEX contributions_peer ON contributions(peer);
CREATE TABLE metrics (
    round INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (round, name));
CREATE TABLE revocations (
    contribution_id TEXT PRIMARY KEY, round INTEGER, peer TEXT, reason TEXT NOT NULL, by TEXT NOT NULL,
    at REAL NOT NULL);
CREATE TABLE bans (peer TEXT PRIMARY KEY, reason TEXT NOT NULL, by TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE checkpoints (
    round INTEGER PRIMARY KEY, file TEXT NOT NULL, weights_hash TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO peers VALUES ('{p0}', 'public', 'cpu', 1.0, 9.0), ('{p1}', NULL, NULL, 2.0, 8.0);
INSERT INTO rounds VALUES (0, 1.0, 5.0, 'quorum', '{h1}', '{h0}'), (1, 5.0, NULL, NULL, NULL, '{h1}');
INSERT INTO contributions(id, round, peer, received_at, bytes, tokens, status, sealed_in) VALUES
    ('a', 0, '{p0}', 2.0, 100, 10, 'accepted', 0),
    ('b', 0, '{p1}', 3.0, 50, 10, 'rejected', NULL),
    ('c', 0, '{p1}', 4.0, 70, 10, 'accepted', 1),
    ('d', 1, '{p0}', 6.0, 30, 10, 'pending', NULL);
"""


def test_a_version_1_history_is_migrated_with_its_counters(tmp_path):
    """A state dir written by the previous release opens with the same numbers the old joins gave."""
    path = tmp_path / "history.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA.format(p0=PEERS[0], p1=PEERS[1], h0="00" * 32, h1="11" * 32))
    conn.close()
    history = History.open(path)
    rounds = {r["round"]: r for r in history.rounds()}
    assert [rounds[0][k] for k in ("accepted", "rejected", "pending", "bytes", "tokens")] == [
        1,
        1,
        0,
        150,
        10,
    ]
    assert [rounds[1][k] for k in ("accepted", "rejected", "pending", "bytes", "tokens")] == [
        1,
        0,
        1,
        100,
        10,
    ]
    peers = {p["peer"]: p for p in history.peers()}
    assert [peers[PEERS[1]][k] for k in ("accepted", "rejected", "bytes", "tokens")] == [1, 1, 120, 10]
    assert history.tokens_seen() == 20
    history.mark_sealed(["d"], 1)  # later writes keep the migrated counters current
    assert history.round(1)["accepted"] == 2 and history.tokens_seen() == 30
    history.close()
    assert _schema_version(path) == SCHEMA_VERSION


def _schema_version(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        conn.close()


def test_a_version_2_history_gains_the_online_count_of_each_seal(tmp_path):
    """Version 2 is version 3 without rounds.peers_online: its rounds keep their counters and show no
    online count (none was recorded), and the next seal records one."""
    path = tmp_path / "history.sqlite"
    history = History.open(path)
    seed_history(history, tmp_path)
    counters = [{k: r[k] for k in ("round", "accepted", "rejected", "tokens")} for r in history.rounds()]
    history.close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "ALTER TABLE rounds DROP COLUMN peers_online; "
        "UPDATE meta SET value = '2' WHERE key = 'schema_version';"
    )
    conn.close()

    history = History.open(path)
    assert _schema_version(path) == SCHEMA_VERSION == 3
    rounds = history.rounds()
    assert [{k: r[k] for k in ("round", "accepted", "rejected", "tokens")} for r in rounds] == counters
    assert {r["peers_online"] for r in rounds} == {None}
    seal_at = T0 + 60 * 8 + 40
    history.touch_peer(PEERS[0], at=seal_at - ONLINE_WINDOW_S)  # heard just within the window
    history.touch_peer(PEERS[1], at=seal_at - ONLINE_WINDOW_S - 0.5)  # just outside it
    history.seal_round(8, weights_hash="ab" * 32, reason="deadline", metrics={}, at=seal_at)
    assert history.round(8)["peers_online"] == 1 and history.round(7)["peers_online"] is None
    history.close()


def _plans(history: History, calls) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of every statement `calls(history)` runs (as SQLite saw it, values bound)."""
    statements: list[str] = []
    history._conn.set_trace_callback(statements.append)
    calls(history)
    history._conn.set_trace_callback(None)
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert reads, "no query ran"
    return {sql: [row[3] for row in history._conn.execute("EXPLAIN QUERY PLAN " + sql)] for sql in reads}


def _hot_queries(history: History) -> None:
    """What the authority runs every tick and what each API page reads."""
    history.contribution(hashlib.sha256(b"x").hexdigest())
    history.record_contribution(
        hashlib.sha256(f"{PEERS[0]}3".encode()).hexdigest(), round=3, peer=PEERS[0], nbytes=1, tokens=1
    )
    history.open_round(8, base_hash="00" * 32)
    history.current_round()
    history.round(5)
    history.rejections(PEERS[3])
    history.is_banned(PEERS[3])
    history.checkpoint(3)
    history.checkpoints()
    history.contributions(round=5)
    history.rounds(before=6, limit=3)
    history.rounds(limit=3, sealed_only=True)
    history.sealed_rounds()
    history.tokens_seen()
    history.metrics(first=2, last=5)
    history.peers(limit=10)
    history.peer_counts(heard_since=0.0)
    history.revocations(limit=10)


def test_hot_queries_use_indexes_and_never_sort_or_scan_a_table(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    seed_history(history, tmp_path)
    for sql, plan in _plans(history, _hot_queries).items():
        for step in plan:
            bare_scan = step.startswith("SCAN") and "INDEX" not in step
            assert not bare_scan and "TEMP B-TREE" not in step, f"{sql}\n  {step}"
    history.close()
