"""nord.codec: round-trip error, error feedback, index codes, determinism and every rejection."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import msgpack
import numpy as np
import pytest
import torch

from nord.codec import CodecConfig, DeltaEncoder, Envelope, SparseTensor, decode_envelope
from nord.codec.envelope import seal_envelope
from nord.codec.indices import BITMAP, FULL, GAPS, OFFSETS, RICE, _rice_encode, decode_indices, encode_indices
from nord.codec.payload import chunk_counts
from nord.errors import CodecError, ConfigError
from nord.identity import Identity, _create_key_file, verify_signature

SPEC = {"embed.weight": (64, 300), "blocks.0.bias": (17,), "blocks.0.weight": (5000,)}
BASE = "ab" * 32
RUN = "test-run"
STEADY = CodecConfig().warmup_rounds  # the first round at the final density (after the default warm-up)


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.from_private_bytes(bytes(range(32)))


def random_delta(seed: int, spec=SPEC, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in spec.items()}


def encode(delta, identity, cfg=CodecConfig(), spec=SPEC, round=STEADY) -> Envelope:
    return DeltaEncoder(cfg, spec).encode(delta, run_id=RUN, round=round, base_hash=BASE, identity=identity)


def densify(sparse: SparseTensor, numel: int) -> torch.Tensor:
    dense = torch.zeros(numel)
    dense[sparse.indices] = sparse.values
    return dense


# --- round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("density", "max_total_err"), [(1.0, 0.10), (0.1, 0.78), (64 / 4096, 0.95)], ids=["d100", "d10", "d1.56"]
)
def test_round_trip_error_is_bounded_per_density(identity, density, max_total_err):
    spec = {"w": (64, 1000)}
    delta = random_delta(0, spec)
    env = decode_envelope(encode(delta, identity, CodecConfig(density=density), spec).to_bytes(), spec)
    sparse = env.delta()["w"]
    x = delta["w"].reshape(-1)
    kept = x[sparse.indices]
    # NF4 of kept values: ~9% relative L2 on Gaussian data; the rest is what top-k did not send.
    assert (sparse.values - kept).norm() / kept.norm() < 0.10
    assert (densify(sparse, x.numel()) - x).norm() / x.norm() < max_total_err
    # every chunk sent its k values; those that quantized to exactly 0 (~9% on Gaussians) are dropped
    assert 0.85 * density * x.numel() < len(sparse.indices) <= 1.01 * density * x.numel()


def test_kept_values_are_the_largest_of_each_chunk(identity):
    spec = {"w": (3 * 4096 + 100,)}
    delta = random_delta(1, spec)
    sparse = encode(delta, identity, spec=spec).delta()["w"]
    x = delta["w"].abs()
    for start in range(0, x.numel(), 4096):
        chunk = x[start : start + 4096]
        inside = sparse.indices[(sparse.indices >= start) & (sparse.indices < start + 4096)] - start
        k = 64 if chunk.numel() == 4096 else 2  # ceil(100 / 64)
        assert len(inside) == k
        assert chunk[inside].min() >= chunk.topk(k).values.min()


def test_small_tensor_is_one_chunk_with_at_least_one_value(identity):
    spec = {"bias": (17,)}
    sparse = encode({"bias": torch.arange(1.0, 18.0)}, identity, spec=spec).delta()["bias"]
    assert sparse.indices.tolist() == [16]
    assert sparse.values.tolist() == [17.0]


def test_delta_drops_values_that_dequantize_to_zero(identity):
    spec = {"w": (4096,)}
    sparse = encode({"w": torch.zeros(4096)}, identity, spec=spec).delta()["w"]
    assert sparse.indices.numel() == 0 and sparse.values.dtype == torch.float32


def test_delta_of_a_subset_of_the_spec(identity):
    delta = random_delta(2)
    del delta["embed.weight"]
    env = decode_envelope(encode(delta, identity).to_bytes(), SPEC)
    assert env.names == ("blocks.0.bias", "blocks.0.weight")
    assert set(env.delta()) == {"blocks.0.bias", "blocks.0.weight"}


def test_bytes_per_parameter_at_default_density(identity):
    spec = {"w": (256, 4096)}
    env = encode(random_delta(3, spec), identity, spec=spec)
    assert env.nbytes / (256 * 4096) < 0.03


# --- error feedback ------------------------------------------------------------------------------------


def run_rounds(cfg: CodecConfig, identity, rounds: int = 30, n: int = 8192):
    spec = {"w": (n,)}
    enc = DeltaEncoder(cfg, spec)
    g = torch.Generator().manual_seed(4)
    drift = torch.randn(n, generator=g)
    true_sum, sent_sum = torch.zeros(n), torch.zeros(n)
    for t in range(rounds):
        delta = 0.5 * drift + torch.randn(n, generator=g)
        env = enc.encode({"w": delta}, run_id=RUN, round=STEADY + t, base_hash=BASE, identity=identity)
        sent_sum += densify(env.delta()["w"], n)
        true_sum += delta
    return enc, true_sum, sent_sum, delta


def test_error_feedback_makes_sent_sum_track_true_sum(identity):
    enc, true_sum, sent_sum, last = run_rounds(CodecConfig(), identity)
    residual = enc.state_dict()["w"]
    torch.testing.assert_close(sent_sum + residual, true_sum, atol=1e-4, rtol=0)
    assert residual.norm() < 12 * last.norm()  # bounded: ~8x one delta after 30 rounds
    _, true_no_ef, sent_no_ef, _ = run_rounds(CodecConfig(ef_decay=0.0), identity)
    tracking = (true_sum - sent_sum).norm() / true_sum.norm()
    tracking_no_ef = (true_no_ef - sent_no_ef).norm() / true_no_ef.norm()
    assert tracking < 0.6 and tracking_no_ef > 0.85  # 0.53 vs 0.89 here


def test_residual_survives_state_dict_round_trip(identity):
    first, second = random_delta(5), random_delta(6)
    enc = DeltaEncoder(CodecConfig(), SPEC)
    enc.encode(first, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    restarted = DeltaEncoder(CodecConfig(), SPEC)
    restarted.load_state_dict(enc.state_dict())
    a = enc.encode(second, run_id=RUN, round=1, base_hash=BASE, identity=identity)
    b = restarted.encode(second, run_id=RUN, round=1, base_hash=BASE, identity=identity)
    assert a.to_bytes() == b.to_bytes()
    fresh = DeltaEncoder(CodecConfig(), SPEC).encode(
        second, run_id=RUN, round=1, base_hash=BASE, identity=identity
    )
    assert fresh.to_bytes() != a.to_bytes()


def test_load_state_dict_rejects_unknown_or_misshapen_residuals():
    enc = DeltaEncoder(CodecConfig(), SPEC)
    with pytest.raises(CodecError, match="not in this run's model"):
        enc.load_state_dict({"nope": torch.zeros(3)})
    with pytest.raises(CodecError, match="has shape"):
        enc.load_state_dict({"blocks.0.bias": torch.zeros(18)})


def test_failed_encode_leaves_residual_unchanged(identity):
    enc = DeltaEncoder(CodecConfig(), SPEC)
    enc.encode(random_delta(7), run_id=RUN, round=0, base_hash=BASE, identity=identity)
    before = enc.state_dict()
    bad = random_delta(8)
    bad["blocks.0.weight"][3] = float("nan")
    with pytest.raises(CodecError, match="NaN"):
        enc.encode(bad, run_id=RUN, round=1, base_hash=BASE, identity=identity)
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("header", "field"),
    [({"run_id": "Bad Run"}, "run_id"), ({"round": -1}, "round"), ({"base_hash": "abc"}, "base_hash")],
    ids=["run_id", "round", "base_hash"],
)
def test_encode_rejects_bad_header_fields(identity, header, field):
    args = {"run_id": RUN, "round": 0, "base_hash": BASE, **header}
    with pytest.raises(CodecError, match=f"field '{field}' must be"):
        DeltaEncoder(CodecConfig(), SPEC).encode(random_delta(16), identity=identity, **args)


def test_encode_refuses_an_envelope_peers_would_reject(identity):
    enc = DeltaEncoder(CodecConfig(density=1.0, max_payload_bytes=4096), SPEC)
    with pytest.raises(CodecError, match="over codec.max_payload_bytes"):
        enc.encode(random_delta(15), run_id=RUN, round=0, base_hash=BASE, identity=identity)
    assert enc.state_dict() == {}


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"other": torch.zeros(3)}, "not in this run's model"),
        ({"blocks.0.bias": torch.zeros(16)}, "has shape"),
        ({}, "no tensors"),
    ],
    ids=["unknown-name", "wrong-shape", "empty"],
)
def test_encode_rejects_bad_deltas(identity, delta, message):
    with pytest.raises(CodecError, match=message):
        encode(delta, identity)


# --- determinism and identity of contributions ---------------------------------------------------------


def test_envelope_bytes_are_deterministic(identity):
    assert encode(random_delta(9), identity).to_bytes() == encode(random_delta(9), identity).to_bytes()


def test_decoded_envelope_equals_the_encoded_one(identity):
    env = encode(random_delta(10), identity)
    decoded = decode_envelope(env.to_bytes(), SPEC, run_id=RUN)
    assert decoded == env and decoded.contribution_id == env.contribution_id
    for name, sparse in env.delta().items():
        assert torch.equal(sparse.indices, decoded.delta()[name].indices)
        assert torch.equal(sparse.values, decoded.delta()[name].values)


def test_contribution_id_is_sha256_of_length_prefixed_fields(good):
    fields = (good.peer_key, good.run_id.encode(), good.round.to_bytes(8, "big"), good.payload_hash)
    framed = b"".join(len(f).to_bytes(8, "big") + f for f in fields)
    assert good.contribution_id == hashlib.sha256(framed).hexdigest()


def test_contribution_id_depends_on_peer_round_and_payload(identity):
    delta = random_delta(11)
    ids = {
        encode(delta, identity).contribution_id,
        encode(delta, identity, round=1).contribution_id,
        encode(delta, Identity.generate()).contribution_id,
        encode(random_delta(12), identity).contribution_id,
    }
    assert len(ids) == 4 and all(len(i) == 64 for i in ids)


# --- index codes -----------------------------------------------------------------------------------------


def random_positions(density: float, chunks: int = 40, chunk: int = 4096, seed: int = 0) -> np.ndarray:
    """k = density · chunk random positions in each of `chunks` chunks, sorted."""
    rng = np.random.default_rng(seed)
    k = max(1, round(density * chunk))
    return np.sort(np.concatenate([c * chunk + rng.choice(chunk, k, replace=False) for c in range(chunks)]))


@pytest.mark.parametrize(
    ("density", "kind"),
    [(1.0, FULL), (0.6, BITMAP), (0.3, RICE), (0.0156, RICE), (0.003, RICE), (0.0005, OFFSETS)],
    ids=str,
)
def test_shortest_index_code_is_chosen_and_round_trips(density, kind):
    numel, chunk = 40 * 4096, 4096
    indices = random_positions(density)
    chosen, data = encode_indices(indices, numel, chunk)
    assert chosen == kind
    counts = chunk_counts(numel, chunk, max(1, round(density * chunk)), 0)
    np.testing.assert_array_equal(decode_indices(chosen, data, counts, numel, chunk), indices)


def test_rice_code_is_near_the_entropy_of_top_k_positions_and_beats_varint_gaps():
    """At the run's 1.56% (64 of 4096): ≈ 7.5 bits per index (entropy log2 C(4096, 64) / 64 ≈ 7.4) against
    ≈ 9 for one-byte-or-more varint gaps."""
    indices = random_positions(64 / 4096)
    kind, data = encode_indices(indices, 40 * 4096, 4096)
    entropy = math.lgamma(4097) - math.lgamma(65) - math.lgamma(4033)
    bits = 8 * len(data) / len(indices)
    assert kind == RICE and entropy / math.log(2) / 64 < bits < 7.6
    gaps = np.diff(indices, prepend=-1) - 1
    assert bits < 8 * np.where(gaps < 128, 1, 2).mean() - 1


EDGE_SETS = {
    "first": [0],
    "last": [2**20 - 1],
    "run": [0, 1, 2, 3],
    "huge-gaps": [5, 2**19, 2**20 - 1],
    "even": list(range(0, 2**20, 2**14)),
}


@pytest.mark.parametrize("bits", [0, 5, 16])
@pytest.mark.parametrize("name", EDGE_SETS)
def test_rice_code_round_trips_edge_sets_at_every_parameter(name, bits):
    """Gaps of 0, gaps far above 2^bits (long unary high parts) and a single index survive the code."""
    indices = np.array(EDGE_SETS[name], dtype=np.int64)
    data = rice_code(indices, bits)
    assert data[0] == bits
    decoded = decode_indices(RICE, data, np.array([len(indices)]), 2**20, 2**20)
    np.testing.assert_array_equal(decoded, indices)


def rice_code(indices: np.ndarray, bits: int) -> bytes:
    return _rice_encode(np.diff(indices, prepend=-1) - 1, bits)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: bytes([17]) + d[1:], "parameter in \\[0, 16\\]"),
        (lambda d: b"", "parameter in"),
        (lambda d: d + b"\x00", "padding after its last gap"),
        (lambda d: d[:-1], "gaps, expected 3"),
        (lambda d: d + b"\x01", "4 gaps, expected 3"),
        (lambda d: d[:2] + bytes([d[2] | 1]) + d[3:], "padding bits set"),
        (lambda d: d + b"\xff" * 200, "impossible for 3 indices"),
    ],
    ids=["parameter", "empty", "trailing-byte", "truncated", "extra-gap", "low-padding", "too-long"],
)
def test_rice_code_rejects_malformed_streams(mangle, message):
    indices = np.array([3, 100, 900], dtype=np.int64)
    data = rice_code(indices, 5)  # 1 + 2 (15 low bits) + unary bytes
    with pytest.raises(CodecError, match=message):
        decode_indices(RICE, mangle(data), np.array([3]), 1024, 1024)


def test_rice_code_rejects_gaps_that_run_past_the_tensor():
    data = rice_code(np.array([3, 100, 2000], dtype=np.int64), 5)
    with pytest.raises(CodecError, match="out of range"):
        decode_indices(RICE, data, np.array([3]), 1024, 1024)


# --- config and rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"chunk_size": 0}, {"density": 0.0}, {"density": 1.5}, {"blocksize": 48}, {"ef_decay": 2.0}],
    ids=["chunk", "density0", "density>1", "blocksize", "ef_decay"],
)
def test_codec_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        CodecConfig(**kwargs)


@pytest.fixture(scope="module")
def good(identity) -> Envelope:
    return encode(random_delta(13), identity)


def fields(env: Envelope) -> list:
    return list(msgpack.unpackb(env.to_bytes(), raw=False))


def pack(values: list) -> bytes:
    return msgpack.packb(values, use_bin_type=True)


def resign(env: Envelope, identity: Identity, *, payload=None, names=None, shapes=None, **header) -> bytes:
    """A correctly hashed and signed envelope around whatever (malformed) payload or header we want."""
    sealed = seal_envelope(
        run_id=header.get("run_id", env.run_id),
        round=env.round,
        base_hash=env.base_hash,
        names=env.names if names is None else names,
        shapes=env.shapes if shapes is None else shapes,
        payload=env.payload if payload is None else payload,
        identity=identity,
    )
    return sealed.to_bytes()


def payload_with(env: Envelope, tensor: int, field: int, value) -> bytes:
    blocksize, entries = msgpack.unpackb(env.payload, raw=False)
    entries[tensor][field] = value
    return pack([blocksize, entries])


def reject(data: bytes, message: str, **kwargs) -> None:
    with pytest.raises(CodecError, match=message):
        decode_envelope(data, SPEC, **kwargs)


def test_rejects_unknown_version(good):
    reject(pack([2, *fields(good)[1:]]), "unknown envelope version 2")


def test_rejects_unknown_tensor_name(good, identity):
    spec = dict(SPEC, extra=(4,))
    env = encode({"extra": torch.ones(4)}, identity, spec=spec)
    reject(env.to_bytes(), "'extra' is not in this run's model")


def test_rejects_shape_not_in_model(good, identity):
    reject(resign(good, identity, shapes=((64, 300), (18,), (5000,))), "'blocks.0.bias' has shape")


def test_rejects_names_out_of_model_order(good, identity):
    data = resign(good, identity, names=good.names[::-1], shapes=good.shapes[::-1])
    reject(data, "do not follow the model's order")


def test_rejects_counts_that_do_not_match(good, identity):
    reject(resign(good, identity, payload=payload_with(good, 2, 1, 70)), "code bytes do not match")


def test_rejects_entry_count_mismatch(good, identity):
    blocksize, entries = msgpack.unpackb(good.payload, raw=False)
    reject(resign(good, identity, payload=pack([blocksize, entries[:2]])), "2 tensor entries for 3 tensors")


def test_rejects_oversized_claims_before_allocating(good, identity):
    spec = {"huge": (2**30,)}  # chunk 1 would mean 2^30 chunks, 2^30 values
    payload = pack([64, [[1, 1, 0, GAPS, b"", b"", b""]]])
    data = resign(good, identity, payload=payload, names=("huge",), shapes=((2**30,),))
    with pytest.raises(CodecError, match="0 code bytes do not match 1073741824 values"):
        decode_envelope(data, spec)


def test_rejects_indices_out_of_range(identity):
    spec = {"w": (64,)}
    env = encode({"w": torch.ones(64)}, identity, CodecConfig(density=1 / 64, chunk_size=64), spec)
    blocksize, entries = msgpack.unpackb(env.payload, raw=False)
    entries[0][3:5] = [2, bytes([64])]  # gap code for index 64 in a 64-value tensor
    data = resign(env, identity, payload=pack([blocksize, entries]))
    with pytest.raises(CodecError, match="out of range"):
        decode_envelope(data, spec)


def test_rejects_indices_not_strictly_increasing(identity):
    spec = {"w": (4096,)}
    env = encode(random_delta(14, spec), identity, spec=spec)
    offsets = [5, 3, *range(10, 72)]  # 64 chunk-local 12-bit offsets, the second one going back
    packed = int("".join(format(o, "012b") for o in offsets), 2).to_bytes(96, "big")
    blocksize, entries = msgpack.unpackb(env.payload, raw=False)
    entries[0][3:5] = [OFFSETS, packed]
    with pytest.raises(CodecError, match="not strictly increasing"):
        decode_envelope(resign(env, identity, payload=pack([blocksize, entries])), spec)


def test_rejects_nan_scale(good, identity):
    scales = np.frombuffer(msgpack.unpackb(good.payload)[1][2][6], dtype="<f2").copy()
    scales[0] = np.nan
    reject(resign(good, identity, payload=payload_with(good, 2, 6, scales.tobytes())), "NaN or infinite")


def test_rejects_infinite_scale(good, identity):
    scales = np.frombuffer(msgpack.unpackb(good.payload)[1][2][6], dtype="<f2").copy()
    scales[-1] = np.inf
    reject(resign(good, identity, payload=payload_with(good, 2, 6, scales.tobytes())), "NaN or infinite")


def test_rejects_negative_scale(good, identity):
    scales = np.frombuffer(msgpack.unpackb(good.payload)[1][2][6], dtype="<f2").copy()
    scales[0] = -scales[0]
    reject(resign(good, identity, payload=payload_with(good, 2, 6, scales.tobytes())), "scale is negative")


def test_rejects_envelope_over_size_cap(good):
    assert good.nbytes > 300
    reject(good.to_bytes(), f"{good.nbytes} bytes, over the cap of 300", max_bytes=300)


def test_rejects_wrong_payload_hash(good):
    f = fields(good)
    f[8] = hashlib.sha256(b"other").digest()
    reject(pack(f), "payload hash does not match")


def test_rejects_tampered_payload(good):
    f = fields(good)
    payload = bytearray(f[7])
    payload[-1] ^= 1
    f[7] = bytes(payload)
    reject(pack(f), "payload hash does not match")


def test_rejects_bad_signature(good):
    f = fields(good)
    f[9] = bytes(64)
    reject(pack(f), "bad signature")


def test_rejects_signature_of_another_peer(good):
    f = fields(good)
    f[4] = Identity.generate().public_key
    reject(pack(f), "bad signature")


def test_rejects_wrong_run_id(good):
    reject(good.to_bytes(), "for run 'test-run', not 'other-run'", run_id="other-run")


def test_rejects_trailing_garbage(good):
    reject(good.to_bytes() + b"\x00", "trailing garbage")


def test_rejects_truncated_envelope(good):
    reject(good.to_bytes()[:-5], "not valid msgpack")


@pytest.mark.parametrize(
    ("index", "value", "field"),
    [
        (1, 7, "run_id"),
        (2, -1, "round"),
        (3, "xyz", "base_hash"),
        (4, b"short", "peer_key"),
        (5, "w", "names"),
    ],
    ids=["run_id", "round", "base_hash", "peer_key", "names"],
)
def test_rejects_wrong_field_types(good, index, value, field):
    f = fields(good)
    f[index] = value
    reject(pack(f), f"field '{field}' must be")


def test_rejects_wrong_field_count(good):
    reject(pack(fields(good)[:9]), "9 fields, expected 10")


def test_rejects_non_canonical_encoding(good):
    f = fields(good)
    data = good.to_bytes()
    # the version as a 2-byte uint (0xcd 0x00 0x01) instead of a fixint: same value, other bytes
    assert data[1] == f[0] == 1
    reject(data[:1] + b"\xcd\x00\x01" + data[2:], "not canonically encoded")


def test_rejects_payload_that_is_not_msgpack(good, identity):
    reject(resign(good, identity, payload=b"\xc1"), "payload is not valid msgpack")


def test_rejects_wrong_types_in_payload(good, identity):
    reject(resign(good, identity, payload=payload_with(good, 0, 0, "4096")), "must be integers")


def test_rejects_unknown_index_code(good, identity):
    reject(resign(good, identity, payload=payload_with(good, 2, 3, 9)), "unknown index code 9")


def test_rejects_nonzero_padding_nibble(identity):
    spec = {"b": (17,)}
    env = encode({"b": torch.arange(17.0)}, identity, spec=spec)  # one value: one padding nibble
    blocksize, entries = msgpack.unpackb(env.payload, raw=False)
    entries[0][5] = bytes([entries[0][5][0] & 0xF0])
    with pytest.raises(CodecError, match="padding nibble"):
        decode_envelope(resign(env, identity, payload=pack([blocksize, entries])), spec)


def test_rejects_non_bytes_input():
    with pytest.raises(CodecError, match="must be bytes"):
        decode_envelope("text", SPEC)  # type: ignore[arg-type]


def test_envelope_is_frozen(good):
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.round = 3  # type: ignore[misc]


# --- identity ----------------------------------------------------------------------------------------------


def test_identity_persists_across_load_or_create(tmp_path):
    path = tmp_path / "keys" / "node.key"
    first = Identity.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = Identity.load_or_create(path)
    assert again.public_key == first.public_key and len(first.public_key) == 32
    assert again.public_hex == first.public_key.hex()
    assert list(tmp_path.joinpath("keys").iterdir()) == [path]  # no temp file left behind


def test_identity_creation_never_replaces_an_existing_key(tmp_path):
    path = tmp_path / "node.key"
    first = Identity.load_or_create(path)
    _create_key_file(path, Identity.generate()._key)  # a racing creator loses
    assert Identity.load_or_create(path).public_key == first.public_key


def test_identity_reads_raw_32_byte_keys(tmp_path):
    path = tmp_path / "raw.key"
    path.write_bytes(bytes(range(32)))
    assert (
        Identity.load_or_create(path).public_key == Identity.from_private_bytes(bytes(range(32))).public_key
    )


def test_identity_rejects_garbage_key_file(tmp_path):
    path = tmp_path / "bad.key"
    path.write_bytes(b"not a key at all, and not 32 bytes long")
    with pytest.raises(ConfigError, match="neither a PEM private key"):
        Identity.load_or_create(path)


def test_verify_signature_accepts_only_the_signers_exact_message(identity):
    signature = identity.sign(b"message")
    assert verify_signature(identity.public_key, b"message", signature)
    assert not verify_signature(identity.public_key, b"messagf", signature)
    assert not verify_signature(Identity.generate().public_key, b"message", signature)
    assert not verify_signature(identity.public_key[:31], b"message", signature)
    assert not verify_signature(identity.public_key, b"message", signature[:63])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encode_on_cuda_decodes_on_cpu(identity):
    delta = {name: t.cuda() for name, t in random_delta(17).items()}
    enc = DeltaEncoder(CodecConfig(), SPEC)
    env = enc.encode(delta, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    decoded = decode_envelope(env.to_bytes(), SPEC)
    for name, sparse in decoded.delta().items():
        sent = densify(sparse, delta[name].numel())
        residual = enc.state_dict()[name].reshape(-1)
        torch.testing.assert_close(sent + residual, delta[name].reshape(-1).cpu(), atol=1e-6, rtol=0)
