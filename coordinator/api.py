"""The coordinator's HTTP API and dashboard (FastAPI), served in the same process as the P2P peer.

Reads are open: run summary, peers, rounds, metrics, checkpoints (with their weights hash in an
`X-Nord-Weights-Hash` header), the authority seal that produced a checkpoint (`/checkpoints/<round>.seal`,
the seal's bytes, so a client can check the weights against the run's authority keys), the run's
`/tokenizer.json` (sha256 in `X-Nord-Tokenizer-Sha256`), revocations, the run config, and Prometheus text
at `/metrics`.
Admin actions (revoke a contribution, ban a peer) need `Authorization: Bearer $NORD_ADMIN_TOKEN`;
without that variable on the coordinator they are disabled. Every error is JSON `{"error": "..."}`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from coordinator.history import History
from nord.errors import MergeError, NordError

STATIC_DIR = Path(__file__).parent / "static"
ONLINE_WINDOW_S = 120.0  # a peer seen within this window counts as online
MAX_REASON_CHARS = 500
WEIGHTS_HASH_HEADER = "X-Nord-Weights-Hash"
ROUND_HEADER = "X-Nord-Round"
TOKENIZER_HASH_HEADER = "X-Nord-Tokenizer-Sha256"


class AdminActions(Protocol):
    """What the admin endpoints ask of the run's authority."""

    def revoke(self, contribution_id: str, *, reason: str, by: str) -> None: ...

    def ban(self, peer: str, *, reason: str, by: str) -> None: ...


@dataclass(kw_only=True)
class ApiContext:
    """Everything the API serves; `live` returns what changes while running (multiaddrs, round state).

    `seal_bytes(round)` returns the bytes of the seal whose weights are checkpoint `round` (the seal of
    round - 1), or None where the replica no longer holds it; `tokenizer_path` is the run's tokenizer.json.
    """

    history: History
    run_config: dict[str, Any]  # RunConfig.to_dict()
    checkpoint_dir: Path
    model: dict[str, Any]  # name, parameters, layers, ... (shown as is)
    admin: AdminActions | None = None
    admin_token: str | None = None
    live: Callable[[], dict[str, Any]] = field(default=lambda: {})
    seal_bytes: Callable[[int], bytes | None] = field(default=lambda rnd: None)
    tokenizer_path: Path | None = None
    started_at: float = field(default_factory=time.time)


def join_command(multiaddrs: Sequence[str], run_id: str) -> str:
    """The exact command a volunteer runs; the first multiaddr is the one to give out."""
    maddr = multiaddrs[0] if multiaddrs else "<coordinator-multiaddr>"
    return f"nord-node join --initial-peers {maddr} --run {run_id}"


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="Nord coordinator", docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json"
    )
    history = ctx.history
    run_id = ctx.run_config["run_id"]

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(
            {"error": f"bad request: {where}: {first.get('msg', 'invalid')}"}, status_code=422
        )

    @app.exception_handler(NordError)
    async def _nord_error(_: Request, exc: NordError) -> JSONResponse:
        # MergeError: the request is well-formed but the run's state refuses it (e.g. already sealed)
        return JSONResponse({"error": str(exc)}, status_code=409 if isinstance(exc, MergeError) else 400)

    def summary() -> dict[str, Any]:
        live = ctx.live()
        current = history.current_round()
        sealed = [r for r in history.rounds() if r["sealed_at"] is not None]
        peers = history.peers()
        now = time.time()
        multiaddrs = list(live.get("multiaddrs", ()))
        return {
            "run_id": run_id,
            "model": ctx.model,
            "parameters": ctx.model.get("parameters"),
            "round": current["round"] if current else 0,
            "round_opened_at": current["opened_at"] if current else None,
            "sealed_rounds": len(sealed),
            "tokens_seen": history.tokens_seen(),
            "weights_hash": sealed[-1]["weights_hash"] if sealed else (current or {}).get("base_hash"),
            "peers_total": len(peers),
            "peers_online": sum(1 for p in peers if now - p["last_seen"] < ONLINE_WINDOW_S),
            "multiaddrs": multiaddrs,
            "join_command": join_command(multiaddrs, run_id),
            "authority": live.get("authority"),
            "quorum": ctx.run_config["rounds"]["quorum"],
            "deadline_s": ctx.run_config["rounds"]["deadline_s"],
            "started_at": ctx.started_at,
            "now": now,
        }

    @app.get("/api/summary")
    def get_summary() -> dict[str, Any]:
        return summary()

    @app.get("/api/peers")
    def get_peers() -> list[dict[str, Any]]:
        now = time.time()
        return [{**p, "online": now - p["last_seen"] < ONLINE_WINDOW_S} for p in history.peers()]

    @app.get("/api/rounds")
    def get_rounds() -> list[dict[str, Any]]:
        return history.rounds()

    @app.get("/api/metrics")
    def get_metrics() -> list[dict[str, Any]]:
        """Per sealed round: validation loss and perplexity, firing rate per layer, bytes, contributions."""
        by_round = history.metrics()
        out = []
        for r in history.rounds():
            if r["sealed_at"] is None and r["round"] not in by_round:
                continue
            out.append(
                {
                    "round": r["round"],
                    "bytes": r["bytes"],
                    "accepted": r["accepted"],
                    "rejected": r["rejected"],
                    "tokens": r["tokens"],
                    **by_round.get(r["round"], {}),
                }
            )
        return out

    @app.get("/api/checkpoints")
    def get_checkpoints() -> list[dict[str, Any]]:
        return [{**c, "url": f"/checkpoints/{c['round']}.safetensors"} for c in history.checkpoints()]

    @app.get("/api/revocations")
    def get_revocations() -> dict[str, Any]:
        return {"revocations": history.revocations(), "bans": history.bans()}

    @app.get("/api/run-config")
    def get_run_config() -> dict[str, Any]:
        return ctx.run_config

    def checkpoint_row(stem: str, name: str) -> dict[str, Any]:
        if stem == "latest":
            row = history.latest_checkpoint()
            if row is None:
                raise HTTPException(404, "no checkpoint saved yet")
            return row
        if stem.isdigit():
            row = history.checkpoint(int(stem))
            if row is None:
                kept = ", ".join(str(c["round"]) for c in history.checkpoints()) or "none"
                raise HTTPException(404, f"no checkpoint for round {stem} (kept: {kept})")
            return row
        raise HTTPException(404, f"bad checkpoint name {name!r}: expected <round>.safetensors or latest")

    @app.get("/checkpoints/{name}")
    def get_checkpoint(name: str) -> Response:
        stem, dot, ext = name.partition(".")
        if ext not in ("safetensors", "seal") or not dot:
            raise HTTPException(
                404, f"no such file {name!r}: use /checkpoints/<round>.safetensors (or .seal) or latest"
            )
        row = checkpoint_row(stem, name)
        headers = {WEIGHTS_HASH_HEADER: row["weights_hash"], ROUND_HEADER: str(row["round"])}
        if ext == "seal":
            if row["round"] == 0:
                raise HTTPException(404, "checkpoint 0 holds the run's initial weights: no seal produced it")
            seal = ctx.seal_bytes(row["round"])
            if seal is None:
                raise HTTPException(404, f"the seal of checkpoint {row['round']} is no longer held here")
            return Response(seal, media_type="application/octet-stream", headers=headers)
        path = ctx.checkpoint_dir / row["file"]
        if not path.is_file():
            raise HTTPException(404, f"checkpoint for round {row['round']} was removed")
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{run_id}-round{row['round']}.safetensors",
            headers=headers,
        )

    @app.get("/tokenizer.json")
    def get_tokenizer() -> Response:
        path = ctx.tokenizer_path
        if path is None or not path.is_file():
            raise HTTPException(404, "this coordinator has no tokenizer.json for the run")
        data = path.read_bytes()
        return Response(
            data,
            media_type="application/json",
            headers={TOKENIZER_HASH_HEADER: hashlib.sha256(data).hexdigest()},
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return prometheus_text(summary(), history.peers(), history.metrics())

    def require_admin(request: Request) -> AdminActions:
        if not ctx.admin_token or ctx.admin is None:
            raise HTTPException(403, "admin API disabled: start the coordinator with NORD_ADMIN_TOKEN set")
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(
                401, "admin API needs 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(token.encode(), ctx.admin_token.encode()):
            raise HTTPException(401, "wrong admin token", {"WWW-Authenticate": "Bearer"})
        return ctx.admin

    def reason_of(body: dict[str, Any] | None, default: str) -> str:
        if body is None:
            return default
        reason = body.get("reason", default)
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS:
            raise HTTPException(
                400, f"'reason' must be a non-empty string of at most {MAX_REASON_CHARS} characters"
            )
        return reason.strip()

    @app.post("/api/admin/revoke/{contribution_id}")
    def admin_revoke(
        contribution_id: str, request: Request, body: dict[str, Any] | None = Body(None)
    ) -> dict[str, Any]:
        admin = require_admin(request)
        if history.contribution(contribution_id) is None:
            raise HTTPException(404, f"unknown contribution {contribution_id!r}")
        reason = reason_of(body, "revoked by admin")
        admin.revoke(contribution_id, reason=reason, by="admin")
        return {"revoked": contribution_id, "reason": reason}

    @app.post("/api/admin/ban/{peer}")
    def admin_ban(peer: str, request: Request, body: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
        admin = require_admin(request)
        if not all(ch in "0123456789abcdef" for ch in peer) or len(peer) != 64:
            raise HTTPException(400, f"peer must be a 64-digit lowercase hex public key, got {peer[:80]!r}")
        reason = reason_of(body, "banned by admin")
        admin.ban(peer, reason=reason, by="admin")
        return {"banned": peer, "reason": reason}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def prometheus_text(
    summary: dict[str, Any], peers: list[dict[str, Any]], metrics: dict[int, dict[str, float]]
) -> str:
    """Prometheus exposition format (text 0.0.4): run gauges, per-peer counters, latest round metrics."""
    run = _label(summary["run_id"])
    lines = []

    def gauge(name: str, value: float | None, help_text: str, labels: str = "", kind: str = "gauge") -> None:
        if value is None or not math.isfinite(float(value)):
            return
        if not any(line.startswith(f"# HELP {name} ") for line in lines):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.append(f'{name}{{run="{run}"{labels}}} {float(value):.10g}')

    gauge("nord_round", summary["round"], "Current (open) round.")
    gauge("nord_sealed_rounds", summary["sealed_rounds"], "Rounds sealed so far.", kind="counter")
    gauge(
        "nord_tokens_seen_total",
        summary["tokens_seen"],
        "Tokens trained on in accepted contributions.",
        kind="counter",
    )
    gauge("nord_parameters", summary["parameters"], "Trainable parameters of the model.")
    gauge("nord_peers", summary["peers_total"], "Peers ever seen.")
    gauge("nord_peers_online", summary["peers_online"], "Peers seen in the last two minutes.")
    for p in peers:
        labels = f',peer="{_label(p["peer"])}"'
        gauge(
            "nord_peer_contributions_accepted",
            p["accepted"],
            "Accepted contributions per peer.",
            labels,
            "counter",
        )
        gauge(
            "nord_peer_contributions_rejected",
            p["rejected"],
            "Rejected or revoked contributions.",
            labels,
            "counter",
        )
        gauge(
            "nord_peer_bytes_total",
            p["bytes"],
            "Bytes of contributions received per peer.",
            labels,
            "counter",
        )
    if metrics:
        latest = metrics[max(metrics)]
        for name, value in sorted(latest.items()):
            metric, _, layer = name.partition("/")
            labels = f',layer="{_label(layer)}"' if layer else ""
            gauge(f"nord_{_metric_name(metric)}", value, f"{metric} at the latest sealed round.", labels)
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
