"""The history's reads, shared by the authority's `History` and the API's `HistoryReader`.

Every method is one indexed query (coordinator/history_schema.py says which index serves which); the
subclass supplies `_fetch`, which runs it on its own connection.
"""

from __future__ import annotations

import sqlite3
from typing import Any

_ROUND_ROW = (
    "SELECT r.*, COALESCE(t.accepted, 0) AS accepted, COALESCE(t.rejected, 0) AS rejected, "
    "COALESCE(t.pending, 0) AS pending, COALESCE(t.bytes, 0) AS bytes, COALESCE(t.tokens, 0) AS tokens "
    "FROM rounds r LEFT JOIN round_totals t ON t.round = r.round"
)
_PEER_ROW = (
    "SELECT p.peer, p.name, p.mode, p.device, p.first_seen, p.last_seen, "
    "COALESCE(t.accepted, 0) AS accepted, COALESCE(t.rejected, 0) AS rejected, "
    "COALESCE(t.pending, 0) AS pending, COALESCE(t.bytes, 0) AS bytes, COALESCE(t.tokens, 0) AS tokens, "
    "b.reason AS ban_reason "
    "FROM peers p LEFT JOIN peer_totals t ON t.peer = p.peer LEFT JOIN bans b ON b.peer = p.peer"
)


class HistoryQueries:
    """The reads both sides make; `_fetch(sql, params)` runs one query on the side's own connection."""

    def _fetch(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        raise NotImplementedError

    def _rows(self, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._fetch(sql, params)]

    def _one(self, sql: str, params: tuple = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # ---- peers -----------------------------------------------------------------------------------

    def peers(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """Peers with their counters (accepted, rejected or revoked, pending, bytes, tokens, ban), most
        recently heard from first."""
        return self._rows(_PEER_ROW + " ORDER BY p.last_seen DESC LIMIT ?", (_no_limit(limit),))

    def peer_counts(self, *, heard_since: float) -> tuple[int, int]:
        """(peers ever seen, peers heard from at or after `heard_since`)."""
        total = self._one("SELECT COUNT(*) AS n FROM peers")["n"]
        online = self._one("SELECT COUNT(*) AS n FROM peers WHERE last_seen >= ?", (heard_since,))["n"]
        return int(total), int(online)

    def is_banned(self, peer: str) -> bool:
        return self._one("SELECT 1 FROM bans WHERE peer = ?", (peer,)) is not None

    def bans(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM bans ORDER BY at DESC")

    # ---- contributions ---------------------------------------------------------------------------

    def contribution(self, contribution_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM contributions WHERE id = ?", (contribution_id,))

    def contributions(self, *, round: int | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Contributions of `round` and/or with `status` (all without either), in arrival order."""
        sql, params = "SELECT * FROM contributions WHERE 1", []
        if round is not None:
            sql += " AND round = ?"
            params.append(round)
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        return self._rows(sql + " ORDER BY received_at, id", tuple(params))

    def rejections(self, peer: str) -> int:
        row = self._one(
            "SELECT COUNT(*) AS n FROM contributions WHERE peer = ? AND status IN ('rejected', 'revoked')",
            (peer,),
        )
        return int(row["n"])

    def revocations(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest `limit` revocations (all without a limit), newest first."""
        return self._rows("SELECT * FROM revocations ORDER BY at DESC LIMIT ?", (_no_limit(limit),))

    # ---- rounds and metrics ----------------------------------------------------------------------

    def current_round(self) -> dict[str, Any] | None:
        """The latest round (open or sealed), or None before the first one."""
        return self._one("SELECT * FROM rounds WHERE round = (SELECT MAX(round) FROM rounds)")

    def round(self, round: int) -> dict[str, Any] | None:
        """One round with its counters (as in `rounds`), or None if it was never opened."""
        return self._one(_ROUND_ROW + " WHERE r.round = ?", (round,))

    def rounds(
        self, *, before: int | None = None, limit: int | None = None, sealed_only: bool = False
    ) -> list[dict[str, Any]]:
        """Rounds in ascending order with the contributions each sealed (accepted, tokens), the ones
        rejected or pending while it was open, and the bytes of all: a contribution counts in the round it
        was sealed into, else its own. With `before`/`limit`: the last `limit` rounds below `before`."""
        where = " WHERE r.round < ?" + (" AND r.sealed_at IS NOT NULL" if sealed_only else "")
        rows = self._rows(
            _ROUND_ROW + where + " ORDER BY r.round DESC LIMIT ?",
            (_BEFORE_ALL if before is None else before, _no_limit(limit)),
        )
        return rows[::-1]

    def sealed_rounds(self) -> tuple[int, str | None]:
        """(rounds sealed so far, the weights hash of the latest seal)."""
        count = self._one("SELECT COUNT(*) AS n FROM rounds WHERE sealed_at IS NOT NULL")["n"]
        latest = self._one(
            "SELECT weights_hash FROM rounds WHERE sealed_at IS NOT NULL ORDER BY round DESC LIMIT 1"
        )
        return int(count), latest["weights_hash"] if latest else None

    def metrics(self, *, first: int | None = None, last: int | None = None) -> dict[int, dict[str, float]]:
        """round -> {metric name -> value}, for the rounds in [first, last] (all by default)."""
        rows = self._fetch(  # rows, not dicts: a page of 1,000 rounds is ~10,000 of them
            "SELECT round, name, value FROM metrics WHERE round BETWEEN ? AND ? ORDER BY round, name",
            (-_BEFORE_ALL if first is None else first, _BEFORE_ALL if last is None else last),
        )
        out: dict[int, dict[str, float]] = {}
        for rnd, name, value in rows:
            out.setdefault(rnd, {})[name] = value
        return out

    def tokens_seen(self) -> int:
        row = self._one("SELECT tokens FROM run_totals WHERE run = 0")
        return int(row["tokens"]) if row else 0

    # ---- checkpoints -----------------------------------------------------------------------------

    def checkpoints(self) -> list[dict[str, Any]]:
        """Checkpoints still kept (not deleted), oldest first."""
        return self._rows("SELECT * FROM checkpoints WHERE deleted = 0 ORDER BY round")

    def checkpoint(self, round: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM checkpoints WHERE round = ? AND deleted = 0", (round,))

    def latest_checkpoint(self) -> dict[str, Any] | None:
        return self._one("SELECT * FROM checkpoints WHERE deleted = 0 ORDER BY round DESC LIMIT 1")


_BEFORE_ALL = 1 << 62  # above any round number SQLite stores


def _no_limit(limit: int | None) -> int:
    return -1 if limit is None else limit  # SQLite: LIMIT -1 is no limit
