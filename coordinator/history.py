"""Run history in SQLite: peers, rounds, contributions, metrics, seals, revocations, bans, checkpoints.

Two ways in, both over one WAL file (schema and indexes: coordinator/history_schema.py; the reads both
share: coordinator/history_queries.py):

    History         the authority's writer: one connection and a lock around every statement; every
                    write is its own transaction (WAL, synchronous=NORMAL: a committed transaction
                    survives a `kill -9`, a power cut may lose the last few)
    HistoryReader   the HTTP API's: a read-only connection per serving thread, each request one read
                    transaction; it never waits for the writer's lock (WAL readers see the last commit)

A crash loses at most the statement in flight, and a restart resumes from here plus the replica's own log.
Per-round and per-peer counters (accepted, rejected, bytes, tokens) live in totals tables kept by triggers
on the contributions table, so no read scans the contributions.

A peer's `last_seen` is the last time it was heard from: a request from it (coordinator.liveness), its
presence record in the DHT, or a contribution of it arriving; holding its contributions is not hearing
from it. A peer is online while it was heard from within ONLINE_WINDOW_S; each seal records how many were
(`rounds.peers_online`), so the dashboard can chart peers online over time.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coordinator.history_queries import HistoryQueries
from coordinator.history_schema import migrate

STATUSES = ("pending", "accepted", "rejected", "revoked")
ONLINE_WINDOW_S = 60.0  # a peer heard from this recently is online


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


class History(HistoryQueries):
    """The run's durable record, written by the authority. Thread-safe; `History.open(path)`, `close()`."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self._conn = conn
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike) -> History:
        """Open (or create) the history at `path`, migrating an older file in place."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(p)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: survives kill -9; a power cut may lose the last tx
        migrate(conn, str(p))
        return cls(conn, p)

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

    def _fetch(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # ---- peers -----------------------------------------------------------------------------------

    def touch_peer(
        self,
        peer: str,
        *,
        mode: str | None = None,
        device: str | None = None,
        name: str | None = None,
        at: float | None = None,
    ) -> None:
        """Record that `peer` was heard from at `at` (now by default); `mode` ('public'/'client'),
        `device` and display `name` update when given."""
        with self._tx() as c:
            _touch(c, peer, time.time() if at is None else at, mode=mode, device=device, name=name)

    def touch_peers(self, heard: Mapping[str, float]) -> None:
        """Record when each peer (key -> time) was heard from, in one transaction."""
        if heard:
            with self._tx() as c:
                for peer, at in heard.items():
                    _touch(c, peer, at)

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
        """Record a newly seen contribution (pending) and that its peer was heard from; return False, and
        change nothing, if it was already known."""
        if self.contribution(contribution_id) is not None:
            return False
        now = time.time() if at is None else at
        with self._tx() as c:
            cur = c.execute(
                "INSERT OR IGNORE INTO contributions(id, round, peer, received_at, bytes, tokens) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (contribution_id, round, peer, now, nbytes, tokens),
            )
            if cur.rowcount == 1:
                _touch(c, peer, now)
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

    def ban(self, peer: str, *, reason: str, by: str, at: float | None = None) -> None:
        """Ban `peer` (listed among the peers even if it never contributed)."""
        now = time.time() if at is None else at
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO peers(peer, first_seen, last_seen) VALUES (?, ?, ?)", (peer, now, 0.0)
            )
            c.execute(
                "INSERT OR IGNORE INTO bans(peer, reason, by, at) VALUES (?, ?, ?, ?)",
                (peer, reason, by, now),
            )

    # ---- rounds and metrics ----------------------------------------------------------------------

    def open_round(self, round: int, *, base_hash: str, at: float | None = None) -> None:
        """Open `round` on top of weights `base_hash` (idempotent: a restart keeps the original time)."""
        if self._one("SELECT 1 FROM rounds WHERE round = ?", (round,)) is not None:
            return  # the authority calls this every tick: a read, no write transaction
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
        """Record the seal of `round` (the weights it produced), its metrics and how many peers were online
        then (heard from within ONLINE_WINDOW_S of `at`, as far as the history knows), in one transaction."""
        now = time.time() if at is None else at
        with self._tx() as c:
            cur = c.execute(
                "UPDATE rounds SET sealed_at = ?, seal_reason = ?, weights_hash = ?, "
                "peers_online = (SELECT COUNT(*) FROM peers WHERE last_seen >= ?) WHERE round = ?",
                (now, reason, weights_hash, now - ONLINE_WINDOW_S, round),
            )
            if cur.rowcount != 1:
                raise ValueError(f"round {round} was never opened")
            for name, value in metrics.items():
                if _finite_or_none(value) is not None:
                    c.execute(
                        "INSERT OR REPLACE INTO metrics(round, name, value) VALUES (?, ?, ?)",
                        (round, name, value),
                    )

    def mark_sealed(self, contribution_ids: list[str], round: int) -> None:
        """Record that `round`'s seal folded these contributions (they count as accepted there)."""
        with self._tx() as c:
            c.executemany(
                "UPDATE contributions SET sealed_in = ?, status = 'accepted' WHERE id = ?",
                [(round, cid) for cid in contribution_ids],
            )

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


class HistoryReader(HistoryQueries):
    """Read-only access for the HTTP API: a connection per thread, never the writer's lock.

    `snapshot()` makes the reads inside it one read transaction (a consistent view across queries).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no history at {self.path}: open it with History.open first")
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _fetch(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    @contextmanager
    def snapshot(self) -> Iterator[HistoryReader]:
        conn = self._conn()
        if conn.in_transaction:  # nested: the outer snapshot already holds the view
            yield self
            return
        conn.execute("BEGIN")
        try:
            yield self
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def _touch(
    c: sqlite3.Connection,
    peer: str,
    at: float,
    *,
    mode: str | None = None,
    device: str | None = None,
    name: str | None = None,
) -> None:
    c.execute(
        "INSERT INTO peers(peer, mode, device, name, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(peer) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen), "
        "first_seen = MIN(first_seen, excluded.first_seen), mode = COALESCE(excluded.mode, mode), "
        "device = COALESCE(excluded.device, device), name = COALESCE(excluded.name, name)",
        (peer, mode, device, name, at, at),
    )


def _finite_or_none(value: float | None) -> float | None:
    """SQLite stores NaN as NULL anyway; make that explicit and keep +-inf out of JSON responses."""
    if value is None:
        return None
    v = float(value)
    return v if v == v and abs(v) != float("inf") else None
