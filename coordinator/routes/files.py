"""Downloads: checkpoints (weights hash in `X-Nord-Weights-Hash`), their seals, the run's tokenizer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from coordinator.routes import errors, service
from coordinator.service import RunService

WEIGHTS_HASH_HEADER = "X-Nord-Weights-Hash"
ROUND_HEADER = "X-Nord-Round"
TOKENIZER_HASH_HEADER = "X-Nord-Tokenizer-Sha256"
OCTETS = "application/octet-stream"

router = APIRouter()
Service = Annotated[RunService, Depends(service)]
_BINARY = {"content": {OCTETS: {"schema": {"type": "string", "format": "binary"}}}}


@router.get(
    "/checkpoints/{name}",
    response_class=Response,
    responses={
        200: {
            **_BINARY,
            "description": "`<round>.safetensors`: the weights (safetensors); `<round>.seal`: the authority "
            "seal that produced them (bytes). Headers X-Nord-Weights-Hash and X-Nord-Round.",
        },
        **errors(404),
    },
)
def get_checkpoint(name: str, svc: Service) -> Response:
    """`<round>.safetensors`, `<round>.seal` or `latest.<ext>`; the round in ASCII digits below 10^9."""
    row, ext = svc.checkpoint_file(name)
    headers = {WEIGHTS_HASH_HEADER: row["weights_hash"], ROUND_HEADER: str(row["round"])}
    if ext == "seal":
        return Response(svc.seal(row), media_type=OCTETS, headers=headers)
    return FileResponse(
        svc.checkpoint_path(row),
        media_type=OCTETS,
        filename=f"{svc.run_id}-round{row['round']}.safetensors",
        headers=headers,
    )


@router.get(
    "/tokenizer.json",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}, "description": "Its sha256 in X-Nord-Tokenizer-Sha256"},
        **errors(404),
    },
)
def get_tokenizer(svc: Service) -> Response:
    """The run's tokenizer.json, as the workers use it."""
    data, sha256 = svc.tokenizer()
    return Response(data, media_type="application/json", headers={TOKENIZER_HASH_HEADER: sha256})
