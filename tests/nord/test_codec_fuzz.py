"""Fuzzing decode_envelope: random, mutated and re-signed malformed envelopes end in a clean CodecError or
a valid decode, never another exception and never a hang."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nord.codec import CodecConfig, DeltaEncoder, Envelope, decode_envelope
from nord.codec.envelope import seal_envelope
from nord.errors import CodecError
from nord.identity import Identity

SPEC = {"a": (8, 70), "b": (5,), "c": (300,)}
IDENTITY = Identity.from_private_bytes(bytes(32))
FUZZ = settings(
    max_examples=100,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
pytestmark = pytest.mark.timeout(120)


def _valid(density: float) -> Envelope:
    g = torch.Generator().manual_seed(0)
    delta = {name: torch.randn(shape, generator=g) for name, shape in SPEC.items()}
    enc = DeltaEncoder(CodecConfig(density=density, chunk_size=256), SPEC)
    return enc.encode(delta, run_id="fuzz", round=3, base_hash="cd" * 32, identity=IDENTITY)


VALID = [_valid(d) for d in (1.0, 0.3, 0.05, 1 / 64)]  # full, bitmap, gaps and offsets index codes

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


def check(data: bytes) -> None:
    """The property: a CodecError, or an envelope whose delta is sane and re-encodes to the same bytes."""
    try:
        env = decode_envelope(data, SPEC, run_id="fuzz", max_bytes=1 << 16)
    except CodecError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert env.to_bytes() == data
    for name, sparse in env.delta().items():
        numel = math.prod(SPEC[name])
        assert sparse.indices.dtype == torch.int64 and sparse.values.dtype == torch.float32
        assert bool(torch.isfinite(sparse.values).all())
        if len(sparse.indices):
            assert 0 <= int(sparse.indices[0]) and int(sparse.indices[-1]) < numel
            assert bool((sparse.indices.diff() > 0).all())


def resign_payload(env: Envelope, payload: bytes) -> bytes:
    return seal_envelope(run_id=env.run_id, round=env.round, base_hash=env.base_hash, names=env.names,
                         shapes=env.shapes, payload=payload, identity=IDENTITY).to_bytes()  # fmt: skip


def mutate(data: bytes, draw) -> bytes:
    buf = bytearray(data)
    kind = draw(st.sampled_from(["flip", "truncate", "append", "overwrite"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "append":
        buf += draw(st.binary(min_size=1, max_size=16))
    else:
        i = draw(st.integers(0, len(buf) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        buf[i : i + len(patch)] = patch
    return bytes(buf)


def test_valid_envelopes_decode():
    for env in VALID:
        check(env.to_bytes())
        assert decode_envelope(env.to_bytes(), SPEC) == env


@FUZZ
@given(st.binary(max_size=3000))
def test_random_bytes(data):
    check(data)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_mutated_envelopes(env, data):
    check(mutate(env.to_bytes(), data.draw))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_swapped_and_replaced_fields(env, data):
    fields = list(msgpack.unpackb(env.to_bytes(), raw=False))
    i = data.draw(st.integers(0, len(fields) - 1))
    if data.draw(st.booleans()):
        j = data.draw(st.integers(0, len(fields) - 1))
        fields[i], fields[j] = fields[j], fields[i]
    else:
        fields[i] = data.draw(msgpack_values)
    check(msgpack.packb(fields, use_bin_type=True))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_resigned_mutated_payloads(env, data):
    check(resign_payload(env, mutate(env.payload, data.draw)))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_resigned_payloads_with_replaced_entry_fields(env, data):
    blocksize, entries = msgpack.unpackb(env.payload, raw=False)
    entry = entries[data.draw(st.integers(0, len(entries) - 1))]
    field = data.draw(st.integers(0, len(entry) - 1))
    entry[field] = data.draw(msgpack_values | st.integers(-3, 5000) | st.binary(max_size=300))
    if data.draw(st.booleans()):
        blocksize = data.draw(st.integers(-1, 5000) | msgpack_values)
    check(resign_payload(env, msgpack.packb([blocksize, entries], use_bin_type=True)))


@FUZZ
@given(msgpack_values)
def test_resigned_arbitrary_payloads(value):
    check(resign_payload(VALID[0], msgpack.packb(value, use_bin_type=True)))
