"""The history's SQLite schema (version 3) and the migration of older state dirs.

Every query the authority runs each tick and every page the API serves is an index lookup or a bounded
range scan (the one exception, counting sealed rounds, reads one partial index), so their cost does not
grow with the run's length:

    rounds          INTEGER PRIMARY KEY; `rounds_sealed` (partial) for the sealed count and the latest seal;
                    `peers_online`: peers heard from within ONLINE_WINDOW_S of the seal (version 3; NULL
                    for rounds sealed before it, nothing can tell how many were online then)
    contributions   `contributions_peer_status` for a peer's rejections; `contributions_round_arrival` for
                    a round's contributions in arrival order
    round_totals    per round: accepted, rejected, pending, bytes, tokens (version 1 computed them with a
                    LEFT JOIN on COALESCE(sealed_in, round): a scan of rounds × contributions per read)
    run_totals      the same counters for the whole run (one row)
    peer_totals     per peer: the same counters plus the first and last contribution time

The totals are kept by triggers on `contributions`, inside the transaction that changes a row, so they are
derived from the contributions table and cannot drift from it; a version-1 file gets them computed once
when it is opened. Each migration runs in one transaction when an older file is opened:

    1 -> 2    the totals tables, computed from the contributions
    2 -> 3    rounds.peers_online (the online count sampled at each seal)
"""

from __future__ import annotations

import sqlite3

from nord.errors import ConfigError

SCHEMA_VERSION = 3

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer TEXT PRIMARY KEY, mode TEXT, device TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    name TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, opened_at REAL NOT NULL, sealed_at REAL, seal_reason TEXT,
    weights_hash TEXT, base_hash TEXT, peers_online INTEGER
);
CREATE TABLE IF NOT EXISTS contributions (
    id TEXT PRIMARY KEY, round INTEGER NOT NULL, peer TEXT NOT NULL, received_at REAL NOT NULL,
    bytes INTEGER NOT NULL, tokens INTEGER NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
    reason TEXT, loss_before REAL, loss_after REAL, norm REAL, sealed_in INTEGER
);
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
CREATE TABLE IF NOT EXISTS round_totals (
    round INTEGER PRIMARY KEY, accepted INTEGER NOT NULL, rejected INTEGER NOT NULL,
    pending INTEGER NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS run_totals (
    run INTEGER PRIMARY KEY CHECK (run = 0), accepted INTEGER NOT NULL, rejected INTEGER NOT NULL,
    pending INTEGER NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS peer_totals (
    peer TEXT PRIMARY KEY, accepted INTEGER NOT NULL, rejected INTEGER NOT NULL,
    pending INTEGER NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL,
    first_contribution REAL, last_contribution REAL
);
DROP INDEX IF EXISTS contributions_peer;
DROP INDEX IF EXISTS contributions_round;
CREATE INDEX IF NOT EXISTS contributions_round_arrival ON contributions(round, received_at, id);
CREATE INDEX IF NOT EXISTS contributions_peer_status ON contributions(peer, status);
CREATE INDEX IF NOT EXISTS rounds_sealed ON rounds(round) WHERE sealed_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS peers_last_seen ON peers(last_seen);
CREATE INDEX IF NOT EXISTS peer_totals_tokens ON peer_totals(tokens);
CREATE INDEX IF NOT EXISTS revocations_at ON revocations(at);
CREATE INDEX IF NOT EXISTS checkpoints_kept ON checkpoints(round) WHERE deleted = 0;
"""

# What one contribution row adds to its round's and its peer's totals (a round counts what it sealed,
# else what arrived for it and is still pending or was rejected; a peer counts its accepted ones).
_ROUND_COUNTS = {
    "round": "COALESCE({r}.sealed_in, {r}.round)",
    "accepted": "{s} * ({r}.sealed_in IS NOT NULL)",
    "rejected": "{s} * ({r}.status IN ('rejected', 'revoked'))",
    "pending": "{s} * ({r}.status = 'pending')",
    "bytes": "{s} * {r}.bytes",
    "tokens": "{s} * CASE WHEN {r}.sealed_in IS NOT NULL THEN {r}.tokens ELSE 0 END",
}
_RUN_COUNTS = {"run": "0", **{k: v for k, v in _ROUND_COUNTS.items() if k != "round"}}
_PEER_COUNTS = {
    "peer": "{r}.peer",
    "accepted": "{s} * ({r}.status = 'accepted')",
    "rejected": "{s} * ({r}.status IN ('rejected', 'revoked'))",
    "pending": "{s} * ({r}.status = 'pending')",
    "bytes": "{s} * {r}.bytes",
    "tokens": "{s} * CASE WHEN {r}.sealed_in IS NOT NULL THEN {r}.tokens ELSE 0 END",
    "first_contribution": "{r}.received_at",
    "last_contribution": "{r}.received_at",
}
_COMBINE = {  # how a row's value joins the totals (and how the totals are rebuilt from the rows)
    "first_contribution": ("MIN(first_contribution, excluded.first_contribution)", "MIN"),
    "last_contribution": ("MAX(last_contribution, excluded.last_contribution)", "MAX"),
}


def _upsert(table: str, columns: dict[str, str], row: str, sign: int) -> str:
    """INSERT ... ON CONFLICT that adds `sign` × `row`'s counts to its totals row."""
    key, *counted = columns
    values = ", ".join(expr.format(r=row, s=sign) for expr in columns.values())
    updates = ", ".join(f"{c} = {_COMBINE.get(c, (f'{c} + excluded.{c}',))[0]}" for c in counted)
    return (
        f"INSERT INTO {table}({', '.join(columns)}) VALUES ({values}) "
        f"ON CONFLICT({key}) DO UPDATE SET {updates};"
    )


def _rebuild(table: str, columns: dict[str, str]) -> str:
    """Recompute `table` from every contribution row (the migration from version 1)."""
    key, *counted = columns
    aggregates = [f"{_COMBINE.get(c, (None, 'SUM'))[1]}({columns[c].format(r='c', s=1)})" for c in counted]
    return (
        f"DELETE FROM {table};\n"
        f"INSERT INTO {table}({', '.join(columns)}) "
        f"SELECT {columns[key].format(r='c')}, {', '.join(aggregates)} FROM contributions c GROUP BY 1;\n"
    )


def _counting(row: str, sign: int) -> str:
    return "\n".join(_upsert(t, cols, row, sign) for t, cols in _TOTALS.items())


_TOTALS = {"round_totals": _ROUND_COUNTS, "run_totals": _RUN_COUNTS, "peer_totals": _PEER_COUNTS}

TRIGGERS = f"""
CREATE TRIGGER IF NOT EXISTS contributions_counted_insert AFTER INSERT ON contributions BEGIN
{_counting("NEW", 1)}
END;
CREATE TRIGGER IF NOT EXISTS contributions_counted_update
AFTER UPDATE OF round, peer, bytes, tokens, status, sealed_in ON contributions BEGIN
{_counting("OLD", -1)}
{_counting("NEW", 1)}
END;
CREATE TRIGGER IF NOT EXISTS contributions_counted_delete AFTER DELETE ON contributions BEGIN
{_counting("OLD", -1)}
END;
"""

REBUILD_TOTALS = "".join(_rebuild(t, cols) for t, cols in _TOTALS.items())


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file to SCHEMA_VERSION in one transaction: create what is missing, compute a version-1
    file's totals from its contributions, add the columns later versions gave existing tables."""
    version = _version(conn)
    if version is not None and version > SCHEMA_VERSION:
        raise ConfigError(
            f"{path} has history schema version {version}, newer than this Nord's ({SCHEMA_VERSION}): "
            "upgrade Nord"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(TABLES + TRIGGERS + (REBUILD_TOTALS if version == 1 else "")):
            conn.execute(statement)
        _add_column(conn, "peers", "name TEXT")  # display names: nullable, no version bump
        _add_column(conn, "rounds", "peers_online INTEGER")  # version 3
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _add_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    """Add `column` ("name TYPE") to an existing `table` that lacks it (a file from an older version)."""
    if column.split()[0] not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _version(conn: sqlite3.Connection) -> int | None:
    """The file's schema version; None for a new file (version 1 wrote it at creation)."""
    has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
    return int(row[0]) if row else None


def _statements(script: str) -> list[str]:
    """Split a script into statements (triggers hold `;` inside BEGIN ... END)."""
    out, current = [], ""
    for line in script.strip().splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out
