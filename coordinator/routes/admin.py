"""Admin actions: revoke a contribution of the open round, ban a peer (`Authorization: Bearer <token>`).

The token and the body size are checked before the body is read (coordinator.http_limits); these
handlers see only authenticated requests with small bodies.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends

from coordinator.routes import errors, service
from coordinator.service import RunService

router = APIRouter(prefix="/api/admin", responses=errors(400, 401, 403, 413, 422))
Service = Annotated[RunService, Depends(service)]
Reason = Annotated[dict[str, Any] | None, Body(examples=[{"reason": "spam"}])]


@router.post("/revoke/{contribution_id}", responses=errors(404, 409))
def admin_revoke(contribution_id: str, svc: Service, body: Reason = None) -> dict[str, Any]:
    """Remove a contribution of the open round from the set (a signed removal), with a reason."""
    return svc.revoke(contribution_id, body)


@router.post("/ban/{peer}")
def admin_ban(peer: str, svc: Service, body: Reason = None) -> dict[str, Any]:
    """Ban a peer (hex ed25519 key): its pending contributions are removed, later ones rejected."""
    return svc.ban(peer, body)
