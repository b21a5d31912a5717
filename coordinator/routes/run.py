"""Read-only JSON about the run: summary, peers, rounds, per-round metrics, checkpoints, revocations.

Handlers return their JSON directly (no response-model pass over every row: a page of 1,000 rounds of
metrics is serialized once), and lists of rounds are paged: the newest `limit` below `before`, oldest
first, with `Link: <...>; rel="next"` to the page before while there may be one.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from coordinator.routes import errors, service
from coordinator.service import MAX_ROUND, PAGE_DEFAULT, PAGE_MAX, RunService

router = APIRouter(prefix="/api", responses=errors(422), default_response_class=JSONResponse)
Service = Annotated[RunService, Depends(service)]
Before = Annotated[
    int | None, Query(ge=0, le=MAX_ROUND + 1, description="only rounds below this one (default: all)")
]
Limit = Annotated[int, Query(ge=1, le=PAGE_MAX, description="page size")]


def _paged(request: Request, page: list[dict[str, Any]], limit: int) -> JSONResponse:
    headers = {}
    if len(page) == limit and page[0]["round"] > 0:
        url = request.url.include_query_params(before=page[0]["round"], limit=limit)
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    return JSONResponse(page, headers=headers)


@router.get("/summary")
def get_summary(svc: Service) -> JSONResponse:
    """The run at a glance: round, sealed rounds, tokens, latest weights hash, peers online, join command."""
    return JSONResponse(svc.summary())


@router.get("/peers")
def get_peers(svc: Service, limit: Limit = PAGE_MAX) -> JSONResponse:
    """Peers most recently heard from first, `online` when heard within `online_window_s` of the summary."""
    return JSONResponse(svc.peers(limit))


@router.get("/rounds")
def get_rounds(
    request: Request, svc: Service, before: Before = None, limit: Limit = PAGE_DEFAULT
) -> JSONResponse:
    """Rounds with their contribution counters (accepted, rejected, pending, bytes, tokens) and
    `peers_online`: peers heard from within `online_window_s` when the round was sealed (null while open,
    and for rounds sealed before the history recorded it)."""
    return _paged(request, svc.rounds(before, limit), limit)


@router.get("/metrics")
def get_metrics(
    request: Request, svc: Service, before: Before = None, limit: Limit = PAGE_MAX
) -> JSONResponse:
    """Per sealed round: validation loss, perplexity, firing rate per layer, bytes, contributions, and
    `peers_online` at the seal (peers heard from within `online_window_s`; null before it was recorded)."""
    return _paged(request, svc.metrics(before, limit), limit)


@router.get("/checkpoints")
def get_checkpoints(svc: Service) -> JSONResponse:
    """Checkpoints still kept, with their weights hash and download URL."""
    return JSONResponse(svc.checkpoints())


@router.get("/revocations")
def get_revocations(svc: Service, limit: Limit = PAGE_DEFAULT) -> JSONResponse:
    """The newest `limit` revocations and every ban."""
    return JSONResponse(svc.revocations(limit))


@router.get("/run-config")
def get_run_config(svc: Service) -> JSONResponse:
    """The run config as served to joining peers."""
    return JSONResponse(svc.ctx.run_config)
