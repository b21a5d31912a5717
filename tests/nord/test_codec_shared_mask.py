"""nord.codec shared masks (CodecConfig.mask = "shared"): every replica derives the positions."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch

from nord.codec import CodecConfig, DeltaEncoder, decode_envelope
from nord.codec.encoder import shared_indices
from nord.codec.envelope import seal_envelope
from nord.codec.indices import SHARED, encode_seed
from nord.codec.payload import parse_payload
from nord.config import RunConfig
from nord.errors import CodecError, ConfigError
from nord.identity import Identity

SPEC = {
    "embed.weight": (3, 4096),
    "blocks.0.weight": (5000,),
    "blocks.0.bias": (17,),
}  # full + partial chunks
RUN = "shared-run"
BASE = "ef" * 32
SHARED_CFG = CodecConfig(density=64 / 4096, warmup_rounds=0, mask="shared", mask_seed=7)


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.from_private_bytes(bytes(range(32)))


def delta_of(seed: int) -> dict[str, torch.Tensor]:
    """|values| in [1, 2]: no kept value quantizes to 0, so decoded positions = kept positions."""
    g = torch.Generator().manual_seed(seed)
    return {
        n: (1 + torch.rand(s, generator=g)) * (torch.randint(0, 2, s, generator=g) * 2 - 1)
        for n, s in SPEC.items()
    }


def decoded(env, spec=SPEC):
    return decode_envelope(env.to_bytes(), spec, run_id=RUN).delta()


def encode(cfg, delta, identity, round=3):
    return DeltaEncoder(cfg, SPEC).encode(delta, run_id=RUN, round=round, base_hash=BASE, identity=identity)


def test_round_trip_sends_k_values_per_chunk_at_the_derived_positions(identity):
    delta = delta_of(0)
    sent = decoded(encode(SHARED_CFG, delta, identity))
    for name, shape in SPEC.items():
        expected, chunk, k, k_last = shared_indices(
            int(np.prod(shape)), SHARED_CFG, 64 / 4096, (RUN, 3, name)
        )
        torch.testing.assert_close(sent[name].indices, expected)
        counts = torch.bincount(expected // chunk).tolist()
        assert counts == [k] * (int(np.prod(shape)) // chunk) + ([k_last] if k_last else [])
        kept = delta[name].reshape(-1)[expected]
        assert (sent[name].values - kept).norm() / kept.norm() < 0.10  # NF4 error only


def test_only_the_seed_travels_so_the_envelope_saves_the_index_bytes(identity):
    delta = delta_of(1)
    shared = encode(SHARED_CFG, delta, identity)
    top_k = encode(CodecConfig(density=64 / 4096, warmup_rounds=0), delta, identity)
    _, entries = msgpack.unpackb(shared.payload, raw=False)
    assert [(e[3], e[4]) for e in entries] == [(SHARED, b"\x07")] * len(SPEC)
    _, top_k_entries = msgpack.unpackb(top_k.payload, raw=False)
    assert [len(e[5]) for e in entries] == [len(e[5]) for e in top_k_entries]  # same number of values
    index_bytes = sum(len(e[4]) for e in top_k_entries)
    assert top_k.nbytes - shared.nbytes >= index_bytes - 3 * len(SPEC)  # minus msgpack framing


def test_every_peer_gets_the_same_mask_and_it_changes_with_round_tensor_and_seed(identity):
    peers = [decoded(encode(SHARED_CFG, delta_of(seed), identity)) for seed in (2, 3)]
    torch.testing.assert_close(peers[0]["embed.weight"].indices, peers[1]["embed.weight"].indices)
    mask = peers[0]["embed.weight"].indices
    other_round = decoded(encode(SHARED_CFG, delta_of(2), identity, round=4))["embed.weight"].indices
    other_seed = CodecConfig(density=64 / 4096, warmup_rounds=0, mask="shared", mask_seed=8)
    reseeded = decoded(encode(other_seed, delta_of(2), identity))["embed.weight"].indices
    for other in (other_round, reseeded):
        overlap = len(np.intersect1d(mask.numpy(), other.numpy()))
        assert overlap < len(mask) // 4  # independent draws: ~k²/chunk = 1 of 64 per chunk expected
    first = peers[0]["blocks.0.weight"].indices[:64] % 4096
    assert not torch.equal(first, mask[:64] % 4096)  # another tensor, another mask


@pytest.mark.slow
def test_the_mask_is_bit_identical_in_another_process():
    key = ("proc-run", 11, "embed.weight")
    here, *_ = shared_indices(3 * 4096 + 100, SHARED_CFG, 0.0212, key)
    code = (
        "import hashlib; from nord.codec import CodecConfig; from nord.codec.encoder import shared_indices\n"
        "cfg = CodecConfig(density=64 / 4096, warmup_rounds=0, mask='shared', mask_seed=7)\n"
        f"idx, *_ = shared_indices({3 * 4096 + 100}, cfg, 0.0212, {key!r})\n"
        "print(hashlib.sha256(idx.numpy().astype('<i8').tobytes()).hexdigest())\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    assert other.stdout.strip() == hashlib.sha256(here.numpy().astype("<i8").tobytes()).hexdigest()


def test_the_mask_follows_its_specification():
    """The module doc's definition (sha256 → splitmix64 → k smallest tagged keys), recomputed in Python
    integers: a change to the derivation would split old and new replicas, so it must fail here."""
    run, rnd, name, seed, chunk, k = "spec-run", 5, "w", 7, 256, 5
    h = hashlib.sha256()
    for field in (b"nord-mask", run.encode(), rnd.to_bytes(8, "big"), name.encode(), seed.to_bytes(8, "big")):
        h.update(len(field).to_bytes(8, "big") + field)
    base, m = int.from_bytes(h.digest()[:8], "big"), 2**64 - 1

    def key(p: int) -> int:
        z = (base + (p + 1) * 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    expected = []
    for start in range(0, 2 * chunk, chunk):
        tagged = sorted((key(p) & ~0xFFFF) | (p - start) for p in range(start, start + chunk))
        expected += sorted(start + (t & 0xFFFF) for t in tagged[:k])
    cfg = CodecConfig(chunk_size=chunk, density=k / chunk, warmup_rounds=0, mask="shared", mask_seed=seed)
    got, *_ = shared_indices(2 * chunk, cfg, k / chunk, (run, rnd, name))
    assert got.tolist() == expected


def test_error_feedback_stays_exact_with_shared_masks_through_a_warmup(identity):
    """Σ sent + residual = Σ deltas after every round."""
    cfg = CodecConfig(density=64 / 4096, warmup_rounds=3, warmup_density=0.25, mask="shared")
    encoder = DeltaEncoder(cfg, SPEC)
    true_sum = {n: torch.zeros(s).reshape(-1) for n, s in SPEC.items()}
    sent_sum = {n: torch.zeros_like(t) for n, t in true_sum.items()}
    for rnd in range(5):
        g = torch.Generator().manual_seed(rnd)
        delta = {n: torch.randn(s, generator=g) * 1e-3 for n, s in SPEC.items()}
        env = encoder.encode(delta, run_id=RUN, round=rnd, base_hash=BASE, identity=identity)
        residual = encoder.state_dict()
        for name, sparse in decoded(env).items():
            true_sum[name] += delta[name].reshape(-1)
            sent_sum[name][sparse.indices] += sparse.values
            torch.testing.assert_close(
                sent_sum[name] + residual[name].reshape(-1), true_sum[name], rtol=0, atol=1e-6
            )


def resigned_with_index_bytes(env, identity, index_bytes: bytes) -> bytes:
    blocksize, entries = msgpack.unpackb(env.payload, raw=False)
    entries[0][4] = index_bytes
    payload = msgpack.packb([blocksize, entries], use_bin_type=True)
    return seal_envelope(run_id=env.run_id, round=env.round, base_hash=env.base_hash, names=env.names,
                         shapes=env.shapes, payload=payload, identity=identity).to_bytes()  # fmt: skip


@pytest.mark.parametrize(
    "index_bytes",
    [b"", b"\x87\x00", b"\x01\x02", b"\x80\x80\x80\x80\x10", b"\xff"],
    ids=["empty", "non-minimal", "two-varints", "over-2^32", "unterminated"],
)
def test_rejects_a_malformed_seed(identity, index_bytes):
    data = resigned_with_index_bytes(encode(SHARED_CFG, delta_of(4), identity), identity, index_bytes)
    with pytest.raises(CodecError, match="shared mask seed must be one varint"):
        decode_envelope(data, SPEC, run_id=RUN)


def test_a_shared_code_without_the_envelope_header_is_rejected(identity):
    env = encode(SHARED_CFG, delta_of(5), identity)
    with pytest.raises(CodecError, match="needs the envelope's run id and round"):
        parse_payload(env.payload, env.names, env.shapes)
    assert encode_seed(2**32 - 1) == b"\xff\xff\xff\xff\x0f"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask": "random"}, "codec.mask must be one of"),
        ({"mask": None}, "codec.mask must be one of"),
        ({"mask_seed": -1}, "codec.mask_seed"),
        ({"mask_seed": 2**32}, "codec.mask_seed"),
        ({"mask_seed": True}, "codec.mask_seed"),
        ({"mask_seed": 1.0}, "codec.mask_seed"),
    ],
)
def test_codec_config_rejects_bad_mask_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CodecConfig(**kwargs)


def test_default_is_top_k_and_run_config_carries_the_mask_fields():
    assert (CodecConfig().mask, CodecConfig().mask_seed) == ("topk", 0)
    raw = {"run_id": "r", "model": {}, "data": {}, "codec": {"mask": "shared", "mask_seed": 9}}
    run = RunConfig.from_json(RunConfig.from_dict(raw).to_json())
    assert (run.codec.mask, run.codec.mask_seed) == ("shared", 9)
    with pytest.raises(ConfigError, match="codec.mask"):
        RunConfig.from_dict({**raw, "codec": {"mask": "Shared"}})
