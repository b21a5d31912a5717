"""The volunteer's view of a run: who contributed what (the leaderboard) and how far the run got (progress).

Read-only SQL on the run's history, through the API's `HistoryReader` (its own read-only connections,
never the authority's lock); each answer is one read transaction.

    leaderboard   peers ranked by accepted tokens (then accepted contributions, then who came first), with
                  contributions, bytes, rejections and their latest reasons, first/last seen, device,
                  display name and tokens/s; `query` finds a row by key prefix or name
    progress      the open round (contributions pooled against the quorum, deadline), tokens/s, the run's
                  target (rounds.target_tokens or target_rounds) with an ETA at the recent pace, and per
                  round: opened/sealed times, peers that contributed, peers online at the seal, accepted
                  tokens, validation loss

Rates are measured over the last RATE_ROUNDS sealed rounds: the accepted tokens of contributions made for
them divided by the seconds from the first one's opening to the last one's seal, so the peers' rates add
up to the run's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from coordinator.history import ONLINE_WINDOW_S, HistoryReader
from nord.checks import fingerprint

RATE_ROUNDS = 10  # sealed rounds a tokens/s figure covers
REASONS_PER_PEER = 3  # latest distinct rejection reasons listed per peer

_RANKED = """
WITH ranked AS (
    SELECT p.peer, p.name, p.mode, p.device, p.first_seen, p.last_seen,
        COALESCE(t.tokens, 0) AS tokens, COALESCE(t.accepted, 0) AS accepted,
        COALESCE(t.rejected, 0) AS rejected, COALESCE(t.pending, 0) AS pending,
        COALESCE(t.bytes, 0) AS bytes, b.reason AS ban_reason,
        ROW_NUMBER() OVER (
            ORDER BY COALESCE(t.tokens, 0) DESC, COALESCE(t.accepted, 0) DESC, p.first_seen, p.peer
        ) AS rank
    FROM peers p LEFT JOIN peer_totals t ON t.peer = p.peer LEFT JOIN bans b ON b.peer = p.peer
)
SELECT *, COUNT(*) OVER () AS matches FROM ranked
WHERE :any OR peer LIKE :prefix ESCAPE '\\' OR name LIKE :part ESCAPE '\\'
ORDER BY rank LIMIT :limit OFFSET :offset
"""

_REASONS = """
SELECT peer, reason, n, last FROM (
    SELECT peer, COALESCE(reason, 'no reason recorded') AS reason, COUNT(*) AS n, MAX(received_at) AS last,
        ROW_NUMBER() OVER (PARTITION BY peer ORDER BY MAX(received_at) DESC) AS k
    FROM contributions WHERE status IN ('rejected', 'revoked') AND peer IN ({marks})
    GROUP BY peer, COALESCE(reason, 'no reason recorded')
) WHERE k <= ? ORDER BY peer, last DESC
"""


class Leaderboard:
    """Leaderboard and progress answers over one run's history."""

    def __init__(self, history: HistoryReader, *, clock: Callable[[], float] = time.time):
        self.history, self.clock = history, clock

    def leaderboard(self, *, limit: int, offset: int = 0, query: str = "") -> dict[str, Any]:
        """Rows `offset`..`offset + limit` of the ranking, or of the rows `query` matches (keeping their
        rank): a case-insensitive prefix of the key or part of the display name."""
        now = self.clock()
        needle = query.strip().lower()
        params = {
            "any": not needle,
            "prefix": _like(needle) + "%",
            "part": "%" + _like(needle) + "%",
            "limit": limit,
            "offset": offset,
        }
        with self.history.snapshot() as h:
            rows = h._rows(_RANKED, params)
            total, online = h.peer_counts(heard_since=now - ONLINE_WINDOW_S)
            reasons = self._reasons(h, [r["peer"] for r in rows])
            window, peer_tokens = self._rate_window(h)
        matches = rows[0]["matches"] if rows else (0 if needle else total)
        peers = []
        for row in rows:
            row.pop("matches")
            peers.append(
                {
                    **row,
                    "short": fingerprint(row["peer"]),
                    "online": row["last_seen"] >= now - ONLINE_WINDOW_S,
                    "tokens_per_s": _rate(peer_tokens.get(row["peer"], 0), window),
                    "rejection_reasons": reasons.get(row["peer"], []),
                }
            )
        return {
            "peers": peers,
            "matches": matches,
            "total": total,
            "online": online,
            "offset": offset,
            "limit": limit,
            "query": needle,
            "rate_window": window,
            "now": now,
        }

    def progress(self, config: dict[str, Any], *, rounds: int) -> dict[str, Any]:
        """The open round against its quorum and deadline, tokens/s, the run's target with an ETA, and the
        last `rounds` rounds; `config` is the run config's `rounds` section."""
        now = self.clock()
        with self.history.snapshot() as h:
            current = h.current_round()
            open_round = h.round(current["round"]) if current and current["sealed_at"] is None else None
            window, peer_tokens = self._rate_window(h)
            history = h.rounds(limit=rounds)
            contributors: dict[int, int] = {}
            losses: dict[int, dict[str, float]] = {}
            if history:
                first, last = history[0]["round"], history[-1]["round"]
                contributors = _contributors(h, first, last)
                losses = h.metrics(first=first, last=last)
            _, online = h.peer_counts(heard_since=now - ONLINE_WINDOW_S)
            tokens_seen = h.tokens_seen()
            sealed, _ = h.sealed_rounds()
        per_round = [
            {
                "round": r["round"],
                "opened_at": r["opened_at"],
                "sealed_at": r["sealed_at"],
                "contributors": contributors.get(r["round"], 0),
                "peers_online": r["peers_online"],
                "accepted": r["accepted"],
                "tokens": r["tokens"],
                "val_loss": losses.get(r["round"], {}).get("val_loss"),
            }
            for r in history
        ]
        tokens_per_s = _rate(sum(peer_tokens.values()), window)
        return {
            "open_round": _open_round(open_round, config["quorum"], config["deadline_s"]),
            "tokens_seen": tokens_seen,
            "sealed_rounds": sealed,
            "target": _target(config, tokens_seen, sealed, tokens_per_s, window, now),
            "tokens_per_s": tokens_per_s,
            "rate_window": window,
            "peers_online": online,
            "online_window_s": ONLINE_WINDOW_S,
            "rounds": per_round,
            "now": now,
        }

    @staticmethod
    def _reasons(h: HistoryReader, peers: list[str]) -> dict[str, list[dict[str, Any]]]:
        """peer -> its latest REASONS_PER_PEER distinct rejection reasons, with how often each was given."""
        if not peers:
            return {}
        sql = _REASONS.format(marks=", ".join("?" * len(peers)))
        out: dict[str, list[dict[str, Any]]] = {}
        for row in h._rows(sql, (*peers, REASONS_PER_PEER)):
            out.setdefault(row["peer"], []).append({"reason": row["reason"], "count": row["n"]})
        return out

    @staticmethod
    def _rate_window(h: HistoryReader) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """The last RATE_ROUNDS sealed rounds (first, last, seconds) and each peer's accepted tokens in
        them; (None, {}) before the first seal."""
        sealed = h._rows(
            "SELECT round, opened_at, sealed_at FROM rounds WHERE sealed_at IS NOT NULL "
            "ORDER BY round DESC LIMIT ?",
            (RATE_ROUNDS,),
        )
        if not sealed:
            return None, {}
        first, last = sealed[-1], sealed[0]
        rows = h._rows(
            "SELECT peer, SUM(tokens) AS tokens FROM contributions "
            "WHERE round BETWEEN ? AND ? AND sealed_in IS NOT NULL GROUP BY peer",
            (first["round"], last["round"]),
        )
        window = {
            "first_round": first["round"],
            "last_round": last["round"],
            "seconds": max(0.0, last["sealed_at"] - first["opened_at"]),
        }
        return window, {r["peer"]: int(r["tokens"]) for r in rows}


def _contributors(h: HistoryReader, first: int, last: int) -> dict[int, int]:
    """round -> distinct peers that sent a contribution for it (accepted or not)."""
    rows = h._rows(
        "SELECT round, COUNT(DISTINCT peer) AS n FROM contributions "
        "WHERE round BETWEEN ? AND ? GROUP BY round",
        (first, last),
    )
    return {r["round"]: r["n"] for r in rows}


def _open_round(row: dict[str, Any] | None, quorum: int, deadline_s: float) -> dict[str, Any] | None:
    """The open round's fill: contributions pooled (not yet rejected) against the quorum."""
    if row is None:
        return None
    return {
        "round": row["round"],
        "opened_at": row["opened_at"],
        "deadline_at": row["opened_at"] + deadline_s,
        "quorum": quorum,
        "pooled": row["pending"],
        "rejected": row["rejected"],
        "quorum_fill": min(1.0, row["pending"] / quorum),
    }


def _target(
    config: dict[str, Any],
    tokens_seen: int,
    sealed: int,
    tokens_per_s: float | None,
    window: dict[str, Any] | None,
    now: float,
) -> dict[str, Any] | None:
    """The run's goal (rounds.target_tokens or target_rounds), how far it is, and when it is reached at
    the recent pace (tokens/s, or seconds per sealed round over the same window); None without one."""
    if config.get("target_tokens"):
        unit, goal, done = "tokens", config["target_tokens"], tokens_seen
        per_second = tokens_per_s
    elif config.get("target_rounds"):
        unit, goal, done = "rounds", config["target_rounds"], sealed
        rounds_in_window = window["last_round"] - window["first_round"] + 1 if window else 0
        per_second = _rate(rounds_in_window, window)
    else:
        return None
    left = max(0, goal - done)
    eta_s = 0.0 if not left else (left / per_second if per_second else None)
    return {
        "unit": unit,
        "goal": goal,
        "done": done,
        "fraction": min(1.0, done / goal),
        "eta_s": eta_s,
        "eta_at": None if eta_s is None else now + eta_s,
    }


def _rate(tokens: int, window: dict[str, Any] | None) -> float | None:
    if window is None or window["seconds"] <= 0:
        return None
    return tokens / window["seconds"]


def _like(text: str) -> str:
    """`text` as a literal inside a LIKE pattern (escape '\\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
