"""Run history in SQLite: peers, rounds, contributions, metrics, seals, revocations, bans, checkpoints.

The coordinator is the only writer (one connection, WAL journal, a lock around every statement); the
HTTP API reads through the same object. Every write is its own transaction (WAL with synchronous=NORMAL: a
committed transaction survives a `kill -9` of the process, a power cut may lose the last few), so a crash
loses at most the statement in flight, and a restart resumes from here plus the replica's own log.
Peer counters (accepted, rejected, bytes) are computed from the contributions table, never stored twice.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer TEXT PRIMARY KEY, mode TEXT, device TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, opened_at REAL NOT NULL, sealed_at REAL, seal_reason TEXT,
    weights_hash TEXT, base_hash TEXT
);
CREATE TABLE IF NOT EXISTS contributions (
    id TEXT PRIMARY KEY, round INTEGER NOT NULL, peer TEXT NOT NULL, received_at REAL NOT NULL,
    bytes INTEGER NOT NULL, tokens INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    reason TEXT, loss_before REAL, loss_after REAL, norm REAL, sealed_in INTEGER
);
CREATE INDEX IF NOT EXISTS contributions_round ON contributions(round);
CREATE INDEX IF NOT EXISTS contributions_peer ON contributions(peer);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (round, name)
);
CREATE TABLE IF NOT EXISTS revocations (
    contribution_id TEXT PRIMARY KEY, round INTEGER, peer TEXT, reason TEXT NOT NULL, by TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (
    peer TEXT PRIMARY KEY, reason TEXT NOT NULL, by TEXT NOT NULL, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    round INTEGER PRIMARY KEY, file TEXT NOT NULL, weights_hash TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at REAL NOT NULL, deleted INTEGER NOT NULL DEFAULT 0
);
"""

STATUSES = ("pending", "accepted", "rejected", "revoked")


class History:
    """The run's durable record. Thread-safe; use `History.open(path)` and `close()`."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike) -> History:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(p), check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: survives kill -9; a power cut may lose the last tx
        conn.executescript(SCHEMA)
        history = cls(conn)
        history._conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        return history

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._conn.execute(sql, params).fetchall()]

    # ---- meta ------------------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else default

    # ---- peers -----------------------------------------------------------------------------------

    def touch_peer(
        self, peer: str, *, mode: str | None = None, device: str | None = None, at: float | None = None
    ) -> None:
        """Record that `peer` was seen now; `mode` ('public'/'client') and `device` update when given."""
        now = time.time() if at is None else at
        with self._tx() as c:
            c.execute(
                "INSERT INTO peers(peer, mode, device, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(peer) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen), "
                "mode = COALESCE(excluded.mode, mode), device = COALESCE(excluded.device, device)",
                (peer, mode, device, now, now),
            )

    def peers(self) -> list[dict[str, Any]]:
        """Every peer with its counters: accepted, rejected (or revoked), pending, bytes, tokens, ban."""
        return self._rows(
            "SELECT p.peer, p.mode, p.device, p.first_seen, p.last_seen, "
            "COALESCE(SUM(c.status = 'accepted'), 0) AS accepted, "
            "COALESCE(SUM(c.status IN ('rejected', 'revoked')), 0) AS rejected, "
            "COALESCE(SUM(c.status = 'pending'), 0) AS pending, "
            "COALESCE(SUM(c.bytes), 0) AS bytes, "
            "COALESCE(SUM(CASE WHEN c.sealed_in IS NOT NULL THEN c.tokens ELSE 0 END), 0) AS tokens, "
            "b.reason AS ban_reason "
            "FROM peers p LEFT JOIN contributions c ON c.peer = p.peer LEFT JOIN bans b ON b.peer = p.peer "
            "GROUP BY p.peer ORDER BY p.last_seen DESC"
        )

    # ---- contributions ---------------------------------------------------------------------------

    def record_contribution(
        self,
        contribution_id: str,
        *,
        round: int,
        peer: str,
        nbytes: int,
        tokens: int,
        at: float | None = None,
    ) -> bool:
        """Record a newly seen contribution (pending); return False if it was already known."""
        now = time.time() if at is None else at
        self.touch_peer(peer, at=now)
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO contributions(id, round, peer, received_at, bytes, tokens) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (contribution_id, round, peer, now, nbytes, tokens),
            )
            return cur.rowcount == 1

    def set_verdict(
        self,
        contribution_id: str,
        status: str,
        *,
        reason: str | None = None,
        loss_before: float | None = None,
        loss_after: float | None = None,
        norm: float | None = None,
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown contribution status {status!r}")
        with self._tx() as c:
            c.execute(
                "UPDATE contributions SET status = ?, reason = ?, loss_before = COALESCE(?, loss_before), "
                "loss_after = COALESCE(?, loss_after), norm = COALESCE(?, norm) WHERE id = ?",
                (
                    status,
                    reason,
                    _finite_or_none(loss_before),
                    _finite_or_none(loss_after),
                    _finite_or_none(norm),
                    contribution_id,
                ),
            )

    def contribution(self, contribution_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM contributions WHERE id = ?", (contribution_id,))
        return rows[0] if rows else None

    def contributions(self, *, round: int | None = None, status: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM contributions WHERE 1", []
        if round is not None:
            sql += " AND round = ?"
            params.append(round)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        return self._rows(sql + " ORDER BY received_at, id", tuple(params))

    def rejections(self, peer: str) -> int:
        rows = self._rows(
            "SELECT COUNT(*) AS n FROM contributions WHERE peer = ? AND status IN ('rejected', 'revoked')",
            (peer,),
        )
        return int(rows[0]["n"])

    # ---- revocations and bans --------------------------------------------------------------------

    def record_revocation(
        self, contribution_id: str, *, reason: str, by: str, at: float | None = None
    ) -> None:
        """Mark a contribution revoked (removed from the set) and keep the reason for the dashboard."""
        now = time.time() if at is None else at
        with self._tx() as c:
            row = c.execute(
                "SELECT round, peer FROM contributions WHERE id = ?", (contribution_id,)
            ).fetchone()
            rnd, peer = (row["round"], row["peer"]) if row else (None, None)
            c.execute(
                "INSERT OR REPLACE INTO revocations(contribution_id, round, peer, reason, by, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (contribution_id, rnd, peer, reason, by, now),
            )
            c.execute(
                "UPDATE contributions SET status = 'revoked', reason = ? "
                "WHERE id = ? AND status != 'rejected'",
                (reason, contribution_id),
            )

    def revocations(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM revocations ORDER BY at DESC")

    def revoked_ids(self) -> set[str]:
        return {r["contribution_id"] for r in self._rows("SELECT contribution_id FROM revocations")}

    def ban(self, peer: str, *, reason: str, by: str, at: float | None = None) -> None:
        now = time.time() if at is None else at
        self.touch_peer(peer, at=now)
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO bans(peer, reason, by, at) VALUES (?, ?, ?, ?)",
                (peer, reason, by, now),
            )

    def bans(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM bans ORDER BY at DESC")

    def is_banned(self, peer: str) -> bool:
        return bool(self._rows("SELECT 1 FROM bans WHERE peer = ?", (peer,)))

    # ---- rounds and metrics ----------------------------------------------------------------------

    def open_round(self, round: int, *, base_hash: str, at: float | None = None) -> None:
        """Open `round` on top of weights `base_hash` (idempotent: a restart keeps the original time)."""
        now = time.time() if at is None else at
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO rounds(round, opened_at, base_hash) VALUES (?, ?, ?)",
                (round, now, base_hash),
            )

    def seal_round(
        self,
        round: int,
        *,
        weights_hash: str,
        reason: str,
        metrics: Mapping[str, float],
        at: float | None = None,
    ) -> None:
        """Record the seal of `round` (the weights it produced) and its metrics, in one transaction."""
        now = time.time() if at is None else at
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET sealed_at = ?, seal_reason = ?, weights_hash = ? WHERE round = ?",
                (now, reason, weights_hash, round),
            )
            if cur.rowcount != 1:
                raise ValueError(f"round {round} was never opened")
            for name, value in metrics.items():
                if _finite_or_none(value) is not None:
                    c.execute(
                        "INSERT OR REPLACE INTO metrics(round, name, value) VALUES (?, ?, ?)",
                        (round, name, value),
                    )

    def current_round(self) -> dict[str, Any] | None:
        """The latest round (open or sealed), or None before the first one."""
        rows = self._rows("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return rows[0] if rows else None

    def rounds(self) -> list[dict[str, Any]]:
        """Every round with the contributions it sealed (accepted, tokens), the ones rejected while it was
        open, and the bytes of both: a contribution counts in the round it was sealed into, else its own."""
        return self._rows(
            "SELECT r.*, "
            "COALESCE(SUM(c.sealed_in IS NOT NULL), 0) AS accepted, "
            "COALESCE(SUM(c.status IN ('rejected', 'revoked')), 0) AS rejected, "
            "COALESCE(SUM(c.status = 'pending'), 0) AS pending, "
            "COALESCE(SUM(c.bytes), 0) AS bytes, "
            "COALESCE(SUM(CASE WHEN c.sealed_in IS NOT NULL THEN c.tokens ELSE 0 END), 0) AS tokens "
            "FROM rounds r LEFT JOIN contributions c ON COALESCE(c.sealed_in, c.round) = r.round "
            "GROUP BY r.round ORDER BY r.round"
        )

    def mark_sealed(self, contribution_ids: list[str], round: int) -> None:
        """Record that `round`'s seal folded these contributions (they count as accepted there)."""
        with self._tx() as c:
            for cid in contribution_ids:
                c.execute(
                    "UPDATE contributions SET sealed_in = ?, status = 'accepted' WHERE id = ?", (round, cid)
                )

    def metrics(self) -> dict[int, dict[str, float]]:
        """round -> {metric name -> value}."""
        out: dict[int, dict[str, float]] = {}
        for row in self._rows("SELECT round, name, value FROM metrics ORDER BY round, name"):
            out.setdefault(row["round"], {})[row["name"]] = row["value"]
        return out

    def tokens_seen(self) -> int:
        rows = self._rows(
            "SELECT COALESCE(SUM(tokens), 0) AS n FROM contributions WHERE sealed_in IS NOT NULL"
        )
        return int(rows[0]["n"])

    # ---- checkpoints -----------------------------------------------------------------------------

    def record_checkpoint(
        self, round: int, *, file: str, weights_hash: str, nbytes: int, at: float | None = None
    ) -> None:
        now = time.time() if at is None else at
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO checkpoints(round, file, weights_hash, bytes, created_at, deleted) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                (round, file, weights_hash, nbytes, now),
            )

    def mark_checkpoint_deleted(self, round: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE checkpoints SET deleted = 1 WHERE round = ?", (round,))

    def checkpoints(self, *, include_deleted: bool = False) -> list[dict[str, Any]]:
        where = "" if include_deleted else " WHERE deleted = 0"
        return self._rows(f"SELECT * FROM checkpoints{where} ORDER BY round")

    def checkpoint(self, round: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM checkpoints WHERE round = ? AND deleted = 0", (round,))
        return rows[0] if rows else None

    def latest_checkpoint(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM checkpoints WHERE deleted = 0 ORDER BY round DESC LIMIT 1")
        return rows[0] if rows else None


def _finite_or_none(value: float | None) -> float | None:
    """SQLite stores NaN as NULL anyway; make that explicit and keep +-inf out of JSON responses."""
    if value is None:
        return None
    v = float(value)
    return v if v == v and abs(v) != float("inf") else None
