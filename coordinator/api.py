"""The coordinator's HTTP API and dashboard (FastAPI), served in the same process as the P2P peer.

Reads are open: run summary, peers, rounds, metrics, checkpoints (with their weights hash in an
`X-Nord-Weights-Hash` header), the authority seal that produced a checkpoint (`/checkpoints/<round>.seal`,
the seal's bytes, so a client can check the weights against the run's authority keys), the run's
`/tokenizer.json` (sha256 in `X-Nord-Tokenizer-Sha256`), revocations, the run config, and Prometheus text
at `/metrics`. Admin actions (revoke a contribution, ban a peer) need `Authorization: Bearer
$NORD_ADMIN_TOKEN`; without that variable on the coordinator they are disabled.

Every error is JSON `{"error": "..."}` with a 4xx status (a 500 only for a bug). Request bodies are capped
and admin tokens checked before a body is read (coordinator.http_limits); the routes (coordinator/routes/)
are thin layers over `coordinator.service.RunService`, which reads the history on its own connections.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from coordinator.http_limits import RequestGate
from coordinator.routes import admin, files, metrics, run, volunteers
from coordinator.service import ApiContext, ApiError, RunService, join_command
from nord.errors import MergeError, NordError

__all__ = ["ApiContext", "create_app", "join_command"]

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger(__name__)


def create_app(ctx: ApiContext) -> FastAPI:
    """The API and dashboard over `ctx`, behind the request gate."""
    app = FastAPI(
        title="Nord coordinator", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json"
    )
    app.state.service = RunService(ctx)
    for router in (run.router, files.router, admin.router, metrics.router, volunteers.router):
        app.include_router(router)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(RequestGate, admin_token=ctx.admin_token if ctx.admin is not None else None)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as JSON {"error": ...}."""

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error(422, f"bad request: {where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(NordError)
    async def _nord_error(_: Request, exc: NordError) -> JSONResponse:
        # MergeError: the request is well-formed but the run's state refuses it (e.g. already sealed)
        return error(409 if isinstance(exc, MergeError) else 400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error serving %s", request.url.path)
        return error(500, "internal error (logged on the coordinator)")
