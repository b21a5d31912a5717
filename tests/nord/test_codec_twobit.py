"""2-bit values (CodecConfig(value_bits=2)): the code, the encoder's error feedback, the wire checks."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch

from nord.codec import CodecConfig, DeltaEncoder, decode_envelope
from nord.codec.envelope import seal_envelope
from nord.codec.indices import BLOCKS, decode_indices, encode_indices
from nord.codec.twobit import TABLE2, dequantize_2bit, quantize_2bit
from nord.errors import CodecError, ConfigError
from nord.identity import Identity

SPEC = {"w": (64, 300), "b": (17,), "v": (4099,)}
RUN, BASE = "test-run", "cd" * 32
TWO_BIT = CodecConfig(value_bits=2, warmup_rounds=0)


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.from_private_bytes(bytes(range(1, 33)))


def delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in SPEC.items()}


def test_codes_are_the_nearest_level_packed_top_bits_first():
    x = torch.tensor([1.0, -1.0, 0.6, -0.6, 0.79, 0.81, -0.01, 0.01, 0.5], dtype=torch.float32)
    packed, absmax = quantize_2bit(x, blocksize=32)
    assert absmax.tolist() == [1.0] and len(packed) == 3
    assert packed[0] == 0b11_00_10_01  # +1 → 3, −1 → 0, +0.6 → 2, −0.6 → 1
    assert packed[2] & 0b00_111111 == 0  # the unused codes of the last byte are 0
    values = dequantize_2bit(packed, absmax, len(x), 32)
    np.testing.assert_array_equal(values, TABLE2[[3, 0, 2, 1, 2, 3, 1, 2, 2]])


def test_two_bit_envelope_halves_the_value_bytes_and_error_feedback_stays_exact(identity):
    d = delta(0)
    nf4 = DeltaEncoder(CodecConfig(warmup_rounds=0), SPEC)
    two = DeltaEncoder(TWO_BIT, SPEC)
    env4 = nf4.encode(d, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    env2 = two.encode(d, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    value_bytes = {e: sum(len(entry[5]) for entry in msgpack.unpackb(e.payload)[1]) for e in (env4, env2)}
    assert value_bytes[env2] == sum(-(-len(s.indices) // 4) for s in env2.delta().values())
    assert value_bytes[env2] * 2 <= value_bytes[env4] + 2 and env2.nbytes < env4.nbytes
    for sent, encoder in ((env2, two), (env4, nf4)):  # Σ sent + residual = Δ, bit for bit
        decoded = decode_envelope(sent.to_bytes(), SPEC, run_id=RUN).delta()
        for name in SPEC:
            total = encoder.state_dict()[name].reshape(-1).clone()
            total[decoded[name].indices] += decoded[name].values
            torch.testing.assert_close(total, d[name].reshape(-1), rtol=0, atol=0)


def test_two_bit_sends_the_sum_over_rounds(identity):
    """Coarser values, same sum: after 12 rounds of a fixed delta the sent total tracks 12 · Δ up to the
    residual, which stays bounded (it does not grow with the rounds)."""
    encoder, d = DeltaEncoder(CodecConfig(value_bits=2, warmup_rounds=0, density=0.05), SPEC), delta(1)
    sent = {name: torch.zeros(shape).reshape(-1) for name, shape in SPEC.items()}
    norms = []
    for rnd in range(12):
        env = encoder.encode(d, run_id=RUN, round=rnd, base_hash=BASE, identity=identity)
        for name, sparse in decode_envelope(env.to_bytes(), SPEC, run_id=RUN).delta().items():
            sent[name][sparse.indices] += sparse.values
        norms.append(encoder.residual_norm())
    for name in SPEC:
        torch.testing.assert_close(
            sent[name] + encoder.state_dict()[name].reshape(-1), 12 * d[name].reshape(-1)
        )
    assert max(norms[6:]) < 2 * max(norms[:6])


def resigned(env, identity, payload: bytes) -> bytes:
    return seal_envelope(
        run_id=env.run_id, round=env.round, base_hash=env.base_hash, names=env.names, shapes=env.shapes,
        payload=payload, identity=identity,
    ).to_bytes()  # fmt: skip


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda p: [*p[:2], 4], "value bits must be 2 when given"),
        (lambda p: [*p[:2], 3], "value bits must be 2 when given"),
        (lambda p: [*p, 2], "payload must be"),
        (lambda p: p[:2], "code bytes do not match"),  # 2-bit codes read as NF4
    ],
    ids=["explicit-4", "three", "four-fields", "bits-dropped"],
)
def test_rejects_malformed_value_fields(identity, mangle, message):
    env = DeltaEncoder(TWO_BIT, SPEC).encode(delta(2), run_id=RUN, round=0, base_hash=BASE, identity=identity)
    payload = msgpack.packb(mangle(list(msgpack.unpackb(env.payload))), use_bin_type=True)
    with pytest.raises(CodecError, match=message):
        decode_envelope(resigned(env, identity, payload), SPEC, run_id=RUN)


def test_rejects_two_bit_padding_bits(identity):
    env = DeltaEncoder(TWO_BIT, SPEC).encode(delta(3), run_id=RUN, round=0, base_hash=BASE, identity=identity)
    blocksize, entries, bits = msgpack.unpackb(env.payload)
    b_entry = entries[1]  # "b": 17 values, one chunk, k = 1 at 1.56%: one code, 6 padding bits
    b_entry[5] = bytes([b_entry[5][0] | 1])
    payload = msgpack.packb([blocksize, entries, bits], use_bin_type=True)
    with pytest.raises(CodecError, match="padding bits are not 0"):
        decode_envelope(resigned(env, identity, payload), SPEC, run_id=RUN)


@pytest.mark.parametrize("bits", [3, 8, True, 0])
def test_config_rejects_other_value_bits(bits):
    with pytest.raises(ConfigError, match="value_bits"):
        CodecConfig(value_bits=bits)


# --- top-k over blocks (CodecConfig.block) ---------------------------------------------------------------


def test_block_top_k_keeps_the_blocks_with_the_largest_sum_of_squares(identity):
    """One chunk of 64 values in blocks of 8: the block holding one huge value loses to a block of eight
    moderate ones (sum of squares 8 · 4 > 5.5²), and both beat the rest."""
    x = torch.full((64,), 0.01)
    x[3] = 5.5  # block 0
    x[40:48] = 2.0  # block 5
    cfg = CodecConfig(chunk_size=64, density=8 / 64, block=8, warmup_rounds=0, value_bits=2)
    env = DeltaEncoder(cfg, {"x": (64,)}).encode(
        {"x": x}, run_id=RUN, round=0, base_hash=BASE, identity=identity
    )
    assert decode_envelope(env.to_bytes(), {"x": (64,)}, run_id=RUN).delta()["x"].indices.tolist() == list(
        range(40, 48)
    )
    wider = CodecConfig(chunk_size=64, density=16 / 64, block=8, warmup_rounds=0, value_bits=2)
    env = DeltaEncoder(wider, {"x": (64,)}).encode(
        {"x": x}, run_id=RUN, round=0, base_hash=BASE, identity=identity
    )
    kept = decode_envelope(env.to_bytes(), {"x": (64,)}, run_id=RUN).delta()["x"].indices.tolist()
    assert kept == [*range(8), *range(40, 48)]


def test_block_envelopes_cost_a_fraction_of_the_index_bytes_and_keep_error_feedback(identity):
    d = delta(4)
    single = DeltaEncoder(TWO_BIT, SPEC).encode(d, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    cfg = CodecConfig(value_bits=2, warmup_rounds=0, block=8)
    encoder = DeltaEncoder(cfg, SPEC)
    blocks = encoder.encode(d, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    index_bytes = {e: sum(len(entry[4]) for entry in msgpack.unpackb(e.payload)[1]) for e in (single, blocks)}
    assert index_bytes[blocks] * 3 < index_bytes[single]
    decoded = decode_envelope(blocks.to_bytes(), SPEC, run_id=RUN).delta()
    for name in SPEC:
        indices = decoded[name].indices
        if name != "w":  # 17 and 4099 values: blocks of 8 do not divide them, so single values are kept
            assert len(indices) == {"b": 1, "v": 64 + 1}[name]  # k per 4096-chunk, 1 in the 3-value tail
        else:  # whole aligned blocks
            assert len(indices) % 8 == 0 and bool((indices.view(-1, 8)[:, 0] % 8 == 0).all())
            assert bool((indices.view(-1, 8).diff(dim=1) == 1).all())
        total = encoder.state_dict()[name].reshape(-1).clone()
        total[indices] += decoded[name].values
        torch.testing.assert_close(total, d[name].reshape(-1))


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: bytes([17]) + d[1:], "block exponent in"),
        (lambda d: bytes([5]) + d[1:], "blocks of 32 do not divide"),
        (lambda d: d[:1] + bytes([17]) + d[2:], "parameter in"),
    ],
    ids=["exponent", "not-dividing", "rice-parameter"],
)
def test_block_code_rejects_malformed_streams(mangle, message):
    indices = np.array([8, 9, 10, 11, 12, 13, 14, 15, 64, 65, 66, 67, 68, 69, 70, 71], dtype=np.int64)
    kind, data = encode_indices(indices, 128, 128, block=8)
    assert kind == BLOCKS and data[0] == 3
    np.testing.assert_array_equal(decode_indices(BLOCKS, data, np.array([16]), 128, 128), indices)
    with pytest.raises(CodecError, match=message):
        decode_indices(BLOCKS, mangle(data), np.array([16]), 128, 128)


@pytest.mark.parametrize("block", [3, 0, True, 8192])
def test_config_rejects_blocks_that_are_not_powers_of_two_within_the_chunk(block):
    with pytest.raises(ConfigError, match="codec.block"):
        CodecConfig(block=block)


def test_config_rejects_blocks_with_shared_masks():
    with pytest.raises(ConfigError, match="mask='topk' only"):
        CodecConfig(block=8, mask="shared")
