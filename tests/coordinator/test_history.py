"""The run history in SQLite: what the dashboard shows and what a restart resumes from."""

from __future__ import annotations

import sqlite3

from conftest import PEERS, seed_history

from coordinator.history import History


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
