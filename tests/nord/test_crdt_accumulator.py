"""Fixed-point sums: exact in any order, exactly invertible, overflow-safe, one bit-exact materialization."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nord.crdt import FixedPointAccumulator, MergeConfig
from nord.crdt.accumulator import SparseFixedPointAccumulator, _exact_float64, fixed_point, median_scales
from nord.errors import ConfigError, MergeError

SPEC = {"w": (50, 40), "b": (7,)}


@dataclass
class Sparse:
    indices: torch.Tensor
    values: torch.Tensor


def random_delta(rng: random.Random, density: float = 0.1, scale: float = 0.05) -> dict[str, Sparse]:
    out = {}
    for name, shape in SPEC.items():
        n = torch.Size(shape).numel()
        idx = sorted(rng.sample(range(n), max(1, int(n * density))))
        vals = [rng.gauss(0, scale) for _ in idx]
        out[name] = Sparse(torch.tensor(idx, dtype=torch.int64), torch.tensor(vals, dtype=torch.float32))
    return out


def base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(*shape, generator=g) for name, shape in SPEC.items()}


def bits(weights: dict[str, torch.Tensor]) -> bytes:
    return b"".join(weights[n].numpy().tobytes() for n in sorted(weights))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_sums_and_weights_have_identical_bits_in_any_order(seed):
    rng = random.Random(seed)
    deltas = [random_delta(rng) for _ in range(12)]
    results = set()
    for _ in range(4):
        rng.shuffle(deltas)
        acc = FixedPointAccumulator(SPEC, MergeConfig(outer_lr=0.7))
        acc.add_all(deltas)
        results.add(bits(acc.apply_update(base())))
    assert len(results) == 1


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_sparse_and_dense_sums_materialize_the_same_bits(seed):
    rng = random.Random(seed)
    deltas = [random_delta(rng, density=rng.choice([0.01, 0.05])) for _ in range(6)]
    cfg = MergeConfig(outer_lr=0.3, min_contributors=rng.choice([1, 2]))
    dense, sparse = FixedPointAccumulator(SPEC, cfg), SparseFixedPointAccumulator(SPEC, cfg)
    for i, d in enumerate(deltas):
        dense.add(d, key=str(i))
        sparse.add(d, key=str(i))
    dense.add(deltas[2], sign=-1)
    sparse.add(deltas[2], key="2", sign=-1)
    assert bits(dense.apply_update(base())) == bits(sparse.apply_update(base()))
    assert sparse.n == dense.n == 5 and sparse.nbytes() < dense.nbytes()
    with pytest.raises(MergeError, match="already"):
        sparse.add(deltas[0], key="0")
    with pytest.raises(MergeError, match="not in this sum"):
        sparse.add(deltas[2], key="2", sign=-1)


def test_float32_sums_are_not_order_independent_but_fixed_point_is():
    rng = random.Random(1)
    values = [
        torch.tensor([rng.gauss(0, 1) * 10 ** rng.randint(-4, 2)], dtype=torch.float32) for _ in range(16)
    ]
    float_sums, fixed_sums = set(), set()
    cfg = MergeConfig()
    for _ in range(20):
        rng.shuffle(values)
        total = torch.zeros(1, dtype=torch.float32)
        fixed = torch.zeros(1, dtype=torch.int64)
        for v in values:
            total += v
            fixed += fixed_point(v, cfg)
        float_sums.add(total.item())
        fixed_sums.add(fixed.item())
    assert len(float_sums) > 1 and len(fixed_sums) == 1


def test_remove_restores_the_exact_previous_state():
    rng = random.Random(2)
    keep, extra = random_delta(rng), random_delta(rng)
    acc = FixedPointAccumulator(SPEC, MergeConfig())
    acc.add(keep)
    before = {n: (acc.sums[n].clone(), acc.counts[n].clone()) for n in acc.sums}
    acc.add(extra)
    acc.add(extra, sign=-1)
    for n, (s, c) in before.items():
        assert torch.equal(acc.sums[n], s) and torch.equal(acc.counts[n], c)
    assert acc.n == 1


def test_each_coordinate_is_divided_by_its_own_contributor_count():
    cfg = MergeConfig(outer_lr=1.0, damping=0.0)
    acc = FixedPointAccumulator({"b": (4,)}, cfg)
    acc.add({"b": Sparse(torch.tensor([0, 1]), torch.tensor([0.5, 0.25]))})
    acc.add({"b": Sparse(torch.tensor([1, 2]), torch.tensor([0.75, -1.0]))})
    out = acc.apply_update({"b": torch.zeros(4)})["b"]
    assert out.tolist() == [0.5, 0.5, -1.0, 0.0]  # no dilution: coordinate 0 keeps its full 0.5
    strict = FixedPointAccumulator({"b": (4,)}, MergeConfig(min_contributors=2, damping=0.0))
    strict.sums, strict.counts, strict.n = acc.sums, acc.counts, acc.n
    assert strict.apply_update({"b": torch.ones(4)})["b"].tolist() == [1.0, 1.5, 1.0, 1.0]
    damped = FixedPointAccumulator({"b": (4,)}, MergeConfig(damping=1.0))
    damped.sums, damped.counts, damped.n = acc.sums, acc.counts, acc.n
    expected = torch.tensor([0.25, 1 / 3, -0.5, 0.0])  # S/(C + 1), rounded to float32
    assert torch.equal(damped.apply_update({"b": torch.zeros(4)})["b"], expected)


def test_values_are_clipped_and_untouched_coordinates_keep_their_bits():
    cfg = MergeConfig(clip=1.0, damping=0.0)
    acc = FixedPointAccumulator({"b": (3,)}, cfg)
    acc.add({"b": Sparse(torch.tensor([0]), torch.tensor([5.0]))})
    b = torch.tensor([-0.0, 2.0, float("1e-30")])
    out = acc.apply_update({"b": b})["b"]
    assert out[0].item() == 1.0
    assert out[1:].numpy().tobytes() == b[1:].numpy().tobytes()


def test_default_scale_keeps_more_than_ten_thousand_worst_case_contributions_exact():
    cfg = MergeConfig()
    assert cfg.max_term == 2**44 and cfg.capacity == 2**19 - 1
    assert cfg.capacity >= 10_000
    worst = torch.full((1,), cfg.clip)
    term = fixed_point(worst, cfg).item()
    assert term == 2**44
    assert term * cfg.capacity <= 2**63 - 1  # the int64 sum of `capacity` worst-case terms cannot overflow
    assert fixed_point(torch.tensor([2.0**-16 * 3]), cfg).item() == 3 * 2**24  # exact, no rounding


def test_round_capacity_is_enforced():
    acc = FixedPointAccumulator({"b": (2,)}, MergeConfig())
    acc.n = acc.cfg.capacity
    with pytest.raises(MergeError, match="full"):
        acc.add({"b": Sparse(torch.tensor([0]), torch.tensor([1.0]))})


@pytest.mark.parametrize(
    "indices",
    [torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([0, 9]), torch.tensor([-1])],
    ids=["unsorted", "repeated", "out-of-range", "negative"],
)
def test_malformed_contributions_are_rejected_before_any_change(indices):
    acc = FixedPointAccumulator({"b": (4,)}, MergeConfig())
    with pytest.raises(MergeError):
        acc.add({"b": Sparse(indices, torch.ones(len(indices)))})
    with pytest.raises(MergeError, match="unknown tensor"):
        acc.add({"nope": Sparse(torch.tensor([0]), torch.ones(1))})
    assert acc.sums == {} and acc.n == 0


def test_int64_to_float64_is_correctly_rounded():
    xs = [2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 3, 123456789012345678, 0, -1]
    got = _exact_float64(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [float(x) for x in xs]


def test_median_scales_clip_only_above_the_lower_median():
    scales = median_scales({"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0})
    assert scales == {"a": 1.0, "b": 1.0, "c": 0.5, "d": 0.25}
    assert median_scales({}) == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"outer_lr": 0.0},
        {"outer_lr": float("nan")},
        {"frac_bits": 0},
        {"frac_bits": 60},
        {"clip": -1.0},
        {"clip": 2.0**20},
        {"clip": 2.0**12, "frac_bits": 41},
        {"min_contributors": 0},
        {"max_staleness": -1},
        {"outer_lr": "1"},
        {"clip": None},
        {"frac_bits": True},
        {"median_norm_clip": "yes"},
    ],
)
def test_merge_config_rejects_unsafe_settings(kwargs):
    with pytest.raises(ConfigError):
        MergeConfig(**kwargs)
