"""nord.codec density warm-up: the schedule, its validation, and encoding at the scheduled density."""

from __future__ import annotations

import math

import pytest
import torch

from nord.codec import CodecConfig, DeltaEncoder, decode_envelope, density_for_round
from nord.config import RunConfig
from nord.errors import CodecError, ConfigError
from nord.identity import Identity

CHUNK = 4096
SPEC = {"w": (8, CHUNK)}  # 8 full chunks
RUN = "warmup-run"
BASE = "cd" * 32
WARMUP = CodecConfig(density=64 / 4096, warmup_rounds=4, warmup_density=0.25)


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.from_private_bytes(bytes(range(32)))


def far_from_zero_delta(seed: int) -> dict[str, torch.Tensor]:
    """|values| in [1, 2]: every kept value has a nonzero NF4 code, so kept count = decoded count."""
    g = torch.Generator().manual_seed(seed)
    magnitude = 1 + torch.rand(SPEC["w"], generator=g)
    sign = torch.randint(0, 2, SPEC["w"], generator=g) * 2 - 1
    return {"w": magnitude * sign}


def test_schedule_decays_geometrically_from_warmup_to_final_density():
    assert density_for_round(WARMUP, 0) == pytest.approx(0.25)
    assert density_for_round(WARMUP, 1) == pytest.approx(0.125)
    assert density_for_round(WARMUP, 2) == pytest.approx(0.0625)
    assert density_for_round(WARMUP, 3) == pytest.approx(0.03125)
    assert density_for_round(WARMUP, 4) == 64 / 4096
    assert density_for_round(WARMUP, 10_000) == 64 / 4096


def test_without_warmup_every_round_uses_the_density():
    cfg = CodecConfig(density=0.0625, warmup_rounds=0)
    assert {density_for_round(cfg, r) for r in range(50)} == {0.0625}


def test_invalid_round_is_left_to_the_envelope_header_check(identity):
    assert density_for_round(WARMUP, -1) == 64 / 4096
    with pytest.raises(CodecError, match="field 'round' must be"):
        DeltaEncoder(WARMUP, SPEC).encode(
            far_from_zero_delta(0), run_id=RUN, round=-1, base_hash=BASE, identity=identity
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"warmup_rounds": -1}, "warmup_rounds"),
        ({"warmup_rounds": 1.5}, "warmup_rounds"),
        ({"warmup_rounds": True}, "warmup_rounds"),
        ({"warmup_density": 0.0}, "warmup_density"),
        ({"warmup_density": 1.5}, "warmup_density"),
    ],
)
def test_codec_config_rejects_bad_warmup(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CodecConfig(**kwargs)


def test_warmup_never_sends_less_than_the_final_density():
    cfg = CodecConfig(density=0.5, warmup_rounds=3, warmup_density=0.25)
    assert [density_for_round(cfg, r) for r in range(5)] == [0.5] * 5


@pytest.mark.parametrize("round", [0, 1, 2, 3, 4, 7])
def test_encode_keeps_the_scheduled_count_per_chunk(identity, round):
    env = DeltaEncoder(WARMUP, SPEC).encode(
        far_from_zero_delta(round), run_id=RUN, round=round, base_hash=BASE, identity=identity
    )
    sent = decode_envelope(env.to_bytes(), SPEC, run_id=RUN).delta()["w"]
    per_chunk = math.ceil(density_for_round(WARMUP, round) * CHUNK - 1e-9)
    assert len(sent.indices) == 8 * per_chunk
    assert torch.bincount(sent.indices // CHUNK, minlength=8).tolist() == [per_chunk] * 8


def test_error_feedback_stays_exact_while_the_density_changes(identity):
    """Σ sent + residual = Σ deltas after every round, through the warm-up and after it."""
    encoder = DeltaEncoder(WARMUP, SPEC)
    true_sum = torch.zeros(SPEC["w"]).reshape(-1)
    sent_sum = torch.zeros_like(true_sum)
    for rnd in range(6):
        delta = {"w": torch.randn(SPEC["w"], generator=torch.Generator().manual_seed(rnd)) * 1e-3}
        env = encoder.encode(delta, run_id=RUN, round=rnd, base_hash=BASE, identity=identity)
        sparse = decode_envelope(env.to_bytes(), SPEC, run_id=RUN).delta()["w"]
        true_sum += delta["w"].reshape(-1)
        sent_sum[sparse.indices] += sparse.values
        residual = encoder.state_dict()["w"].reshape(-1)
        torch.testing.assert_close(sent_sum + residual, true_sum, rtol=0, atol=1e-6)


def test_a_warmup_round_over_the_payload_cap_halves_its_density_until_it_fits(identity):
    """A large model's round 0: send what fits under max_payload_bytes, keep the rest in the residual."""
    delta = far_from_zero_delta(0)

    def size_at(density: float) -> int:
        encoder = DeltaEncoder(CodecConfig(density=density, warmup_rounds=0), SPEC)
        return encoder.encode(delta, run_id=RUN, round=0, base_hash=BASE, identity=identity).nbytes

    cap = (size_at(0.125) + size_at(0.25)) // 2  # round 0 (25%) is over it, 12.5% fits
    cfg = CodecConfig(density=64 / 4096, warmup_rounds=4, warmup_density=0.25, max_payload_bytes=cap)
    encoder = DeltaEncoder(cfg, SPEC)
    env = encoder.encode(delta, run_id=RUN, round=0, base_hash=BASE, identity=identity)
    assert env.nbytes <= cap
    sent = decode_envelope(env.to_bytes(), SPEC, run_id=RUN, max_bytes=cap).delta()["w"]
    assert len(sent.indices) == 8 * CHUNK // 8  # 12.5% of every chunk
    sent_dense = torch.zeros(SPEC["w"]).reshape(-1)
    sent_dense[sent.indices] = sent.values
    residual = encoder.state_dict()["w"].reshape(-1)
    torch.testing.assert_close(sent_dense + residual, delta["w"].reshape(-1), rtol=0, atol=1e-6)


def test_run_config_carries_the_warmup_fields():
    raw = {
        "run_id": "r",
        "model": {},
        "data": {},
        "codec": {"warmup_rounds": 4, "warmup_density": 0.25},
    }
    run = RunConfig.from_json(RunConfig.from_dict(raw).to_json())
    assert (run.codec.warmup_rounds, run.codec.warmup_density) == (4, 0.25)
    with pytest.raises(ConfigError, match="warmup_rounds"):
        RunConfig.from_dict({**raw, "codec": {"warmup_rounds": -2}})
