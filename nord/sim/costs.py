"""What each message weighs and what each step costs, from the real code.

Sizes are measured, not guessed: envelopes by encoding a real delta of the recipe's shapes with the
real `DeltaEncoder` at every warm-up round's density, seals by `Seal.create` itself, DHT records by
msgpack of the record the gossip service stores.

CPU times are a model fitted by `bench/simulate.py --fit` to timings of the real code (decode_envelope +
Replica.add per envelope, the validator's scoring per contribution, the fold that applies a seal); the
constants below are that fit, and the page docs/simulation.md gives its residuals.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgpack

from nord.fsutil import atomic_write_bytes
from nord.protocol import aggregate_bytes_estimate

# bench/simulate.py --fit, 1 thread, best of 3 CPU times, load average 11-13 (docs/simulation.md)
MERGE_S_FIXED = 7.2e-3  # decode_envelope + Replica.add of one envelope: fixed ...
MERGE_S_PER_BYTE = 6.0e-8  # ... + per envelope byte ...
MERGE_S_PER_PARAM = 2.08e-9  # ... + per model parameter (max residual 32% over tiny and small)
VALIDATE_S_FIXED = 0.096  # the coordinator's scoring of one contribution (2 held-out batches of 8 x 256)
VALIDATE_S_PER_PARAM = 1.164e-7
FOLD_S_FIXED = 7.2e-3  # applying a seal's sums to the weights
FOLD_S_PER_PARAM = 1.515e-8
DIGEST_BYTES_FIXED = 149  # msgpack sync request: run id, round, hashes ...
DIGEST_BYTES_PER_DOT = 86  # ... plus one (peer key hex, round, 16-hex hash) entry per held dot
FETCH_BYTES_PER_ID = 66  # a contribution id in a fetch request (64 hex + msgpack header)
DHT_REPLICAS = 5  # hivemind DHTNode's num_replicas: peers each holder record is stored on
REQUEST_S = 0.004  # CPU of serving one request (frame, hash, handler), bench/simulate.py --validate
SMALL_MESSAGE_BYTES = 64  # a push acknowledgement, an error line, a hello


@dataclass(frozen=True)
class Sizes:
    """Measured sizes for one recipe and the default codec."""

    params: int
    by_round: tuple[int, ...]  # envelope bytes in warm-up rounds 0, 1, ...; the last one from then on
    snapshot_bytes: int  # fp32 safetensors of the weights (a rejoining peer behind compaction)

    def envelope_bytes(self, rnd: int) -> int:
        return self.by_round[min(rnd, len(self.by_round) - 1)]


@functools.lru_cache(maxsize=8)
def measure_sizes(model: str) -> Sizes:
    """Encode one real random delta of `model`'s shapes at each warm-up round's density (cached on disk:
    ~30 s for `small` the first time)."""
    import torch

    from nord.codec import CodecConfig, DeltaEncoder
    from nord.identity import Identity
    from nord.model import NordLM
    from nord.recipes import get_config

    cfg = CodecConfig()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nord" / "sim-sizes.json"
    key = f"{model}:{json.dumps(dataclasses.asdict(cfg), sort_keys=True)}"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    if key in known:
        return Sizes(**{**known[key], "by_round": tuple(known[key]["by_round"])})
    with torch.device("meta"):
        spec = NordLM(get_config(model)).param_spec()
    params = sum(int(torch.Size(s).numel()) for s in spec.values())
    identity = Identity.from_private_bytes(bytes([7]) * 32)
    gen = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in spec.items()}
    by_round = tuple(
        DeltaEncoder(cfg, spec)
        .encode(delta, run_id="sim", round=rnd, base_hash="0" * 64, identity=identity)
        .nbytes
        for rnd in range(cfg.warmup_rounds + 1)
    )
    sizes = Sizes(params=params, by_round=by_round, snapshot_bytes=4 * params + 64 * len(spec))
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, json.dumps({**known, key: dataclasses.asdict(sizes)}).encode())
    return sizes


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


def aggregate_bytes(counts: Mapping[int, int], params: int) -> int:
    """Wire bytes of the `nord.crdt.aggregate.Aggregate` of a seal that folded `counts[q]` contributions
    of round q: a fit to real aggregates (bench/aggregate.py, docs/simulation.md). The changed fraction is
    taken as the union of independent top-k index sets, f = 1 − Π (1 − d_q)^k_q (an upper bound: real
    deltas' indices overlap); the bitmap costs its entropy, the XOR bits a constant per changed value."""
    keep = 1.0
    for q, k in counts.items():
        keep *= (1.0 - density(q)) ** k
    return int(aggregate_bytes_estimate(params, 1.0 - keep, sum(counts.values())))


def density(rnd: int) -> float:
    """The default codec's kept fraction for a round-`rnd` contribution (its density warm-up)."""
    from nord.codec import CodecConfig, density_for_round

    return density_for_round(CodecConfig(), rnd)


@functools.lru_cache(maxsize=1)
def aggregate_record_bytes() -> int:
    """One aggregate holder record in the DHT (key, subkey, value) as `nord.gossip.aggregates` stores it."""
    holder = "12D3KooW" + "x" * 44
    key = "nord/sim-run/aggregate/1000"
    return len(msgpack.packb([key, holder, {"seal": "s" * 64, "holder": holder}], use_bin_type=True))


def merge_s(envelope_bytes: int, params: int) -> float:
    """CPU seconds to decode, check and add one envelope to a replica of a `params`-parameter model."""
    return MERGE_S_FIXED + MERGE_S_PER_BYTE * envelope_bytes + MERGE_S_PER_PARAM * params


def validate_s(params: int) -> float:
    """CPU seconds for the coordinator to score one contribution (on top of merging it)."""
    return VALIDATE_S_FIXED + VALIDATE_S_PER_PARAM * params


def fold_s(params: int) -> float:
    """CPU seconds to apply a verified seal to the weights."""
    return FOLD_S_FIXED + FOLD_S_PER_PARAM * params
