"""Shared fixtures for the nord.crdt tests: a tiny spec, fixed identities, real encoded envelopes."""

from __future__ import annotations

import functools

import torch

from nord.codec import CodecConfig, DeltaEncoder, Envelope
from nord.crdt import MergeConfig, Replica
from nord.identity import Identity

RUN = "crdt-test"
SPEC = {"embed.weight": (12, 16), "block.bias": (40,), "head.weight": (8, 12)}
CODEC = CodecConfig(chunk_size=64, density=0.125)
AUTHORITY = Identity.from_private_bytes(bytes([1]) * 32)
AUTHORITY_2 = Identity.from_private_bytes(bytes([2]) * 32)
PEERS = [Identity.from_private_bytes(bytes([10 + i]) * 32) for i in range(6)]
STRANGER = Identity.from_private_bytes(bytes([99]) * 32)


def base_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {name: torch.randn(*shape, generator=g) for name, shape in SPEC.items()}


@functools.cache
def envelope(peer: int, round: int, base_hash: str, seed: int = 0, scale: float = 0.01) -> Envelope:
    """A real signed envelope of a random delta (fresh encoder: no residual carried between calls)."""
    g = torch.Generator().manual_seed(hash((peer, round, seed)) % 2**31)
    delta = {name: torch.randn(*shape, generator=g) * scale for name, shape in SPEC.items()}
    encoder = DeltaEncoder(CODEC, SPEC)
    return encoder.encode(delta, run_id=RUN, round=round, base_hash=base_hash, identity=PEERS[peer])


def make_replica(
    merge: MergeConfig | None = None, *, authorities=None, log_dir=None, sparse_sums=False
) -> Replica:
    keys = [AUTHORITY.public_key, AUTHORITY_2.public_key] if authorities is None else authorities
    merge = merge or MergeConfig()
    return Replica(
        run_id=RUN,
        spec=SPEC,
        base=base_weights(),
        merge=merge,
        authorities=keys,
        log_dir=log_dir,
        sparse_sums=sparse_sums,
    )


def fingerprint(replica: Replica) -> tuple:
    """Everything replicas must agree on: held elements, removals, chain, pool and weight bits."""
    return (
        tuple(cid for cid, _ in replica.contributions()),
        tuple(r.removal_id for r in replica.removals()),
        tuple(s.seal_id for s in replica.seals()),
        tuple(replica.pool()),
        replica.weights_hash(),
    )
