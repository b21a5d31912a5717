"""The volunteer's view: `/api/leaderboard` (find yourself, see your tokens counted) and `/api/progress`.

Both are reads over coordinator.leaderboard. Parameters are strict: an unknown one is a 400 naming it, a
bad value a 422, pages are at most PAGE_MAX rows.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from coordinator.leaderboard import Leaderboard
from coordinator.routes import errors, service
from coordinator.service import PAGE_MAX, ApiError, RunService

MAX_QUERY_CHARS = 64
LEADERBOARD_PAGE = 50
PROGRESS_ROUNDS = 200


def only(*names: str):
    """A dependency that refuses query parameters other than `names` (a typo is an error, not ignored)."""

    def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(names))
        if unknown:
            allowed = ", ".join(names) or "none"
            raise ApiError(400, f"unknown query parameter {unknown[0][:40]!r} (allowed: {allowed})")

    return Depends(check)


router = APIRouter(prefix="/api", responses=errors(400, 422))
Service = Annotated[RunService, Depends(service)]


def _board(svc: RunService) -> Leaderboard:
    return Leaderboard(svc.history, clock=svc.ctx.clock)


@router.get("/leaderboard", dependencies=[only("limit", "offset", "q")])
def get_leaderboard(
    svc: Service,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="page size")] = LEADERBOARD_PAGE,
    offset: Annotated[int, Query(ge=0, le=10**9, description="rows to skip")] = 0,
    q: Annotated[
        str,
        Query(
            max_length=MAX_QUERY_CHARS,
            pattern=r"^[^\x00-\x1f\x7f]*$",
            description="find rows by key prefix (hex) or part of the display name, case-insensitive",
        ),
    ] = "",
) -> dict[str, Any]:
    """Peers ranked by accepted tokens: contributions, bytes, rejections with their latest reasons,
    first/last seen, device, display name, tokens/s over the last sealed rounds."""
    return _board(svc).leaderboard(limit=limit, offset=offset, query=q)


@router.get("/progress", dependencies=[only("rounds")])
def get_progress(
    svc: Service,
    rounds: Annotated[
        int, Query(ge=1, le=PAGE_MAX, description="how many of the latest rounds to list")
    ] = PROGRESS_ROUNDS,
) -> dict[str, Any]:
    """The open round (pooled contributions against the quorum, deadline), tokens/s, the run's target
    with an ETA, and per round: opened/sealed times, peers that contributed, `peers_online` when it was
    sealed (heard from within `online_window_s`; null while open or before it was recorded), accepted
    tokens, loss."""
    return _board(svc).progress(svc.ctx.run_config["rounds"], rounds=rounds)
