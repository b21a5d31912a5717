"""What each message weighs and what each step costs, from the real code.

Sizes are measured, not guessed: envelopes by encoding a real delta of the recipe's shapes with the
real `DeltaEncoder` at the warm-up's first density and at the final one (envelope bytes are affine in
the density; `bench/simulate.py --fit` checks every warm-up round), seals by `Seal.create` itself,
DHT records by msgpack of the record the gossip service stores.

CPU times are a model fitted by `bench/simulate.py --fit` to timings of the real code (decode_envelope +
Replica.add per envelope, the validator's scoring per contribution, the fold that applies a seal); the
constants below are that fit, and the page docs/simulation.md gives its residuals.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import msgpack

# bench/simulate.py --fit (see docs/simulation.md for the run and the residuals)
MERGE_S_PER_BYTE = 6.0e-8  # decode_envelope + Replica.add, per envelope byte ...
MERGE_S_FIXED = 1.5e-3  # ... plus this per envelope
VALIDATE_S_PER_PARAM = 2.0e-8  # the coordinator's scoring of one contribution (2 held-out batches)
VALIDATE_S_FIXED = 0.02
FOLD_S_PER_PARAM = 4.0e-9  # applying a verified seal's sums to the weights
DIGEST_BYTES_FIXED = 180  # msgpack sync request: run id, round, hashes ...
DIGEST_BYTES_PER_DOT = 92  # ... plus one (peer key hex, round, 16-hex hash) entry per held dot
FETCH_BYTES_PER_ID = 66  # a contribution id in a fetch request (64 hex + msgpack header)
SMALL_MESSAGE_BYTES = 64  # a push acknowledgement, an error line, a hello


@dataclass(frozen=True)
class Sizes:
    """Measured sizes for one recipe and codec."""

    params: int
    first_bytes: int  # envelope at the warm-up's first density
    final_bytes: int  # envelope at the final density
    first_density: float
    final_density: float
    warmup_rounds: int
    snapshot_bytes: int  # fp32 safetensors of the weights (a rejoining peer behind compaction)

    def envelope_bytes(self, rnd: int) -> int:
        """Envelope bytes of a round-`rnd` contribution (affine in the warm-up density)."""
        from nord.codec import CodecConfig, density_for_round

        cfg = CodecConfig(warmup_rounds=self.warmup_rounds, warmup_density=self.first_density)
        d = density_for_round(cfg, rnd)
        span = self.first_density - self.final_density
        frac = (d - self.final_density) / span if span else 0.0
        return int(round(self.final_bytes + frac * (self.first_bytes - self.final_bytes)))


@functools.lru_cache(maxsize=8)
def measure_sizes(model: str) -> Sizes:
    """Encode one real random delta of `model`'s shapes at the first and the final density."""
    import torch

    from nord.codec import CodecConfig, DeltaEncoder, density_for_round
    from nord.identity import Identity
    from nord.model import NordLM
    from nord.recipes import get_config

    with torch.device("meta"):
        spec = NordLM(get_config(model)).param_spec()
    params = sum(int(torch.Size(s).numel()) for s in spec.values())
    cfg = CodecConfig()
    identity = Identity.from_private_bytes(bytes([7]) * 32)
    gen = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in spec.items()}
    sizes = []
    for rnd in (0, cfg.warmup_rounds):
        env = DeltaEncoder(cfg, spec).encode(
            delta, run_id="sim", round=rnd, base_hash="0" * 64, identity=identity
        )
        sizes.append(env.nbytes)
    return Sizes(
        params=params,
        first_bytes=sizes[0],
        final_bytes=sizes[1],
        first_density=density_for_round(cfg, 0),
        final_density=cfg.density,
        warmup_rounds=cfg.warmup_rounds,
        snapshot_bytes=4 * params + 64 * len(spec),
    )


@functools.lru_cache(maxsize=4096)
def seal_bytes(n_contributions: int) -> int:
    """Bytes of a real `Seal` listing `n_contributions` ids (signed by a throwaway key)."""
    from nord.crdt import Seal
    from nord.identity import Identity

    ids = sorted(f"{i:064x}" for i in range(n_contributions))
    seal = Seal.create(
        run_id="sim",
        round=0,
        prev_hash="0" * 64,
        contribution_ids=ids,
        weights_hash="0" * 64,
        window_hash="0" * 64,
        identity=Identity.from_private_bytes(bytes([9]) * 32),
    )
    return len(seal.to_bytes())


@functools.lru_cache(maxsize=1)
def record_bytes() -> int:
    """One holder record in the DHT (key, subkey, value) as the gossip service stores it."""
    cid, holder = "c" * 64, "12D3KooW" + "x" * 44
    value = {"cid": cid, "round": 1000, "size": 350_000, "holder": holder}
    key = "nord/sim-run/contrib/1000"
    return len(msgpack.packb([key, f"{cid}/{holder}", value], use_bin_type=True))


def digest_bytes(dots: int) -> int:
    return DIGEST_BYTES_FIXED + DIGEST_BYTES_PER_DOT * dots


def merge_s(envelope_bytes: int) -> float:
    """CPU seconds to decode, check and add one envelope to a replica."""
    return MERGE_S_FIXED + MERGE_S_PER_BYTE * envelope_bytes


def validate_s(params: int) -> float:
    """CPU seconds for the coordinator to score one contribution (on top of merging it)."""
    return VALIDATE_S_FIXED + VALIDATE_S_PER_PARAM * params


def fold_s(params: int) -> float:
    """CPU seconds to apply a verified seal to the weights."""
    return FOLD_S_PER_PARAM * params
