"""The HTTP API's routers, each a thin layer over `coordinator.service.RunService`.

run.py      /api/summary, /api/peers, /api/rounds, /api/metrics, /api/checkpoints, /api/revocations,
            /api/run-config (JSON; lists are paged with `before`/`limit` and a `Link: rel="next"`)
files.py    /checkpoints/<round>.safetensors|.seal, /tokenizer.json
admin.py    /api/admin/revoke/<id>, /api/admin/ban/<peer> (token checked by coordinator.http_limits)
metrics.py  /metrics, Prometheus text exposition
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel

from coordinator.service import RunService


class ErrorBody(BaseModel):
    """Every error the API returns."""

    error: str


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, all shaped as ErrorBody."""
    return {status: {"model": ErrorBody, "description": _WHAT[status]} for status in statuses}


_WHAT = {
    400: "Bad request (a malformed parameter or body)",
    401: "Missing or wrong admin token",
    403: "Admin API disabled on this coordinator",
    404: "No such resource",
    409: "The run's state refuses the action (e.g. already sealed)",
    413: "Request body over the limit",
    422: "A query or body parameter failed validation",
}


def service(request: Request) -> RunService:
    """FastAPI dependency: the app's RunService."""
    return request.app.state.service
