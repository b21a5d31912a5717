"""What the coordinator's HTTP API serves, as plain methods over the history and the run (no HTTP here).

`RunService` answers the routers in coordinator/routes/: it reads through a `HistoryReader` (its own
SQLite connections, never the authority's locks) and turns bad requests into `ApiError`s, which the API
sends as JSON `{"error": ...}` with their status.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from coordinator.history import ONLINE_WINDOW_S, HistoryReader
from nord.checks import MAX_REASON_CHARS, fingerprint, is_hex64, is_reason

MAX_ROUND = 10**9 - 1  # rounds the API names: at most 9 decimal digits
CHECKPOINT_NAME = re.compile(r"(latest|0|[1-9][0-9]{0,8})\.(safetensors|seal)", re.ASCII)
PAGE_DEFAULT, PAGE_MAX = 100, 1000


class ApiError(Exception):
    """A request the API refuses: sent as JSON {"error": message} with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class AdminActions(Protocol):
    """What the admin endpoints ask of the run's authority."""

    def revoke(self, contribution_id: str, *, reason: str, by: str) -> None: ...

    def ban(self, peer: str, *, reason: str, by: str) -> None: ...


@dataclass(kw_only=True)
class ApiContext:
    """Everything the API serves; `live` returns what changes while running (multiaddrs, round state).

    `history` is the API's own reader of the run's history file. `seal_bytes(round)` returns the bytes of
    the seal whose weights are checkpoint `round` (the seal of round - 1), or None where it is no longer
    held; `tokenizer_path` is the run's tokenizer.json.
    """

    history: HistoryReader
    run_config: dict[str, Any]  # RunConfig.to_dict()
    checkpoint_dir: Path
    model: dict[str, Any]  # name, parameters, layers, ... (shown as is)
    admin: AdminActions | None = None
    admin_token: str | None = None
    live: Callable[[], dict[str, Any]] = field(default=lambda: {})
    seal_bytes: Callable[[int], bytes | None] = field(default=lambda rnd: None)
    tokenizer_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    clock: Callable[[], float] = time.time


def join_command(multiaddrs: Sequence[str], run_id: str, authority: str | None = None) -> str:
    """The exact command a volunteer runs; the first multiaddr is the one to give out, and `--authority`
    pins the run's authority key (hex) so that a config or weights signed by any other are refused."""
    maddr = multiaddrs[0] if multiaddrs else "<coordinator-multiaddr>"
    pin = f" --authority {fingerprint(authority)}" if authority else ""
    return f"nord-node join --initial-peers {maddr} --run {run_id}{pin}"


class RunService:
    """The API's answers for one run."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self.history = ctx.history
        self.run_id = ctx.run_config["run_id"]

    # ---- run state --------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        live = self.ctx.live()
        now = self.ctx.clock()
        with self.history.snapshot() as h:
            current = h.current_round()
            sealed, latest_hash = h.sealed_rounds()
            peers_total, peers_online = h.peer_counts(heard_since=now - ONLINE_WINDOW_S)
            tokens = h.tokens_seen()
        multiaddrs = list(live.get("multiaddrs", ()))
        rounds = self.ctx.run_config["rounds"]
        return {
            "run_id": self.run_id,
            "model": self.ctx.model,
            "parameters": self.ctx.model.get("parameters"),
            "round": current["round"] if current else 0,
            "round_opened_at": current["opened_at"] if current else None,
            "sealed_rounds": sealed,
            "tokens_seen": tokens,
            "weights_hash": latest_hash or (current or {}).get("base_hash"),
            "peers_total": peers_total,
            "peers_online": peers_online,
            "online_window_s": ONLINE_WINDOW_S,
            "multiaddrs": multiaddrs,
            "join_command": join_command(multiaddrs, self.run_id, live.get("authority")),
            "authority": live.get("authority"),
            "quorum": rounds["quorum"],
            "deadline_s": rounds["deadline_s"],
            "started_at": self.ctx.started_at,
            "now": now,
        }

    def peers(self, limit: int) -> list[dict[str, Any]]:
        """Peers heard from most recently first; `online` when heard within ONLINE_WINDOW_S."""
        since = self.ctx.clock() - ONLINE_WINDOW_S
        return [{**p, "online": p["last_seen"] >= since} for p in self.history.peers(limit=limit)]

    def rounds(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        return self.history.rounds(before=before, limit=limit)

    def metrics(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Per sealed round: validation loss and perplexity, firing rate per layer, bytes, contributions,
        peers online at the seal."""
        with self.history.snapshot() as h:
            rounds = h.rounds(before=before, limit=limit, sealed_only=True)
            if not rounds:
                return []
            by_round = h.metrics(first=rounds[0]["round"], last=rounds[-1]["round"])
        keep = ("round", "bytes", "accepted", "rejected", "tokens", "peers_online")
        return [{**{k: r[k] for k in keep}, **by_round.get(r["round"], {})} for r in rounds]

    def revocations(self, limit: int) -> dict[str, Any]:
        with self.history.snapshot() as h:
            return {"revocations": h.revocations(limit=limit), "bans": h.bans()}

    # ---- files ------------------------------------------------------------------------------------

    def checkpoints(self) -> list[dict[str, Any]]:
        return [{**c, "url": f"/checkpoints/{c['round']}.safetensors"} for c in self.history.checkpoints()]

    def checkpoint_file(self, name: str) -> tuple[dict[str, Any], str]:
        """The checkpoint row `name` asks for and the extension asked ('safetensors' or 'seal').

        Names are `<round>.safetensors`, `<round>.seal` or `latest.<ext>`, the round in ASCII decimal
        digits without leading zeros, below 10^9; anything else is a 404 that says so.
        """
        match = CHECKPOINT_NAME.fullmatch(name)
        if match is None:
            raise ApiError(
                404,
                f"bad checkpoint name {name[:80]!r}: expected <round>.safetensors, <round>.seal or "
                f"latest.safetensors, the round in decimal digits (at most {MAX_ROUND})",
            )
        stem, ext = match.groups()
        row = self.history.latest_checkpoint() if stem == "latest" else self.history.checkpoint(int(stem))
        if row is None and stem == "latest":
            raise ApiError(404, "no checkpoint saved yet")
        if row is None:
            kept = ", ".join(str(c["round"]) for c in self.history.checkpoints()) or "none"
            raise ApiError(404, f"no checkpoint for round {stem} (kept: {kept})")
        return row, ext

    def checkpoint_path(self, row: dict[str, Any]) -> Path:
        path = self.ctx.checkpoint_dir / row["file"]
        if not path.is_file():
            raise ApiError(404, f"checkpoint for round {row['round']} was removed")
        return path

    def seal(self, row: dict[str, Any]) -> bytes:
        if row["round"] == 0:
            raise ApiError(404, "checkpoint 0 holds the run's initial weights: no seal produced it")
        seal = self.ctx.seal_bytes(row["round"])
        if seal is None:
            raise ApiError(404, f"the seal of checkpoint {row['round']} is no longer held here")
        return seal

    def tokenizer(self) -> tuple[bytes, str]:
        """The run's tokenizer.json and its sha256."""
        path = self.ctx.tokenizer_path
        if path is None or not path.is_file():
            raise ApiError(404, "this coordinator has no tokenizer.json for the run")
        data = path.read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    # ---- admin (the token was checked before the request was read: coordinator.http_limits) ------

    def revoke(self, contribution_id: str, body: dict[str, Any] | None) -> dict[str, Any]:
        if not is_hex64(contribution_id):
            raise ApiError(
                400, f"contribution id must be 64 lowercase hex digits, got {contribution_id[:80]!r}"
            )
        if self.history.contribution(contribution_id) is None:
            raise ApiError(404, f"unknown contribution {contribution_id!r}")
        reason = _reason(body, "revoked by admin")
        self._admin().revoke(contribution_id, reason=reason, by="admin")
        return {"revoked": contribution_id, "reason": reason}

    def ban(self, peer: str, body: dict[str, Any] | None) -> dict[str, Any]:
        if not is_hex64(peer):
            raise ApiError(400, f"peer must be a 64-digit lowercase hex public key, got {peer[:80]!r}")
        reason = _reason(body, "banned by admin")
        self._admin().ban(peer, reason=reason, by="admin")
        return {"banned": peer, "reason": reason}

    def _admin(self) -> AdminActions:
        if self.ctx.admin is None or not self.ctx.admin_token:
            raise ApiError(403, "admin API disabled: start the coordinator with NORD_ADMIN_TOKEN set")
        return self.ctx.admin


def _reason(body: dict[str, Any] | None, default: str) -> str:
    reason = default if body is None else body.get("reason", default)
    if not is_reason(reason):
        raise ApiError(400, f"'reason' must be a non-empty string of at most {MAX_REASON_CHARS} characters")
    return reason.strip()
