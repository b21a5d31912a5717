"""Neurons: the chunked scan and the compiled kernel agree with the naive loop (values, final state, every
gradient), single steps agree with whole sequences, the kernel falls back to eager when it cannot be built,
the surrogate is the analytic formula, and LIF follows a hand-computed trace."""

from __future__ import annotations

import logging
import math
import os
import shutil

import pytest
import torch

from nord.errors import ConfigError
from nord.neurons import (
    SURROGATES,
    DynamicDecayNeuron,
    DynamicDecayState,
    LIFNeuron,
    LIFParams,
    LIFState,
    dynamic_decay_chunk,
    dynamic_decay_naive,
    integer_spike,
    lif_scan,
    spike,
)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float = 1e-5) -> None:
    """Relative RMS error of `got` against `ref` below `ratio` (fla's assert_close)."""
    ref, got = ref.detach().double(), got.detach().double()
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if ref.numel() == 0:  # e.g. the window of a one-tap conv
        return
    err = (ref - got).pow(2).mean().sqrt()
    base = ref.pow(2).mean().sqrt().clamp_min(1e-12)
    assert err / base <= ratio, f"{name}: relative RMS error {float(err / base):.3g} > {ratio}"


def random_inputs(B: int, T: int, D: int, seed: int = 0, strength: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64).float().requires_grad_()
    log_a = torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen) * strength + 1.0)
    log_a = log_a.detach().requires_grad_()
    h0 = torch.randn(B, D, generator=gen).requires_grad_()
    return x, log_a, h0


def outputs_and_grads(fn, x, log_a, h0, seed=1, **kw):
    h, h_final = fn(x, log_a, h0, return_final=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    dh, dh_final = torch.randn(h.shape, generator=gen), torch.randn(h_final.shape, generator=gen)
    inputs = [x, log_a] + ([h0] if h0 is not None else [])
    grads = torch.autograd.grad((h * dh).sum() + (h_final * dh_final).sum(), inputs)
    return h, h_final, grads


SHAPES = [(2, 1, 17), (2, 63, 17), (2, 64, 17), (2, 65, 17), (2, 200, 17), (1, 200, 5)]


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("B,T,D", SHAPES, ids=[f"B{b}-T{t}-D{d}" for b, t, d in SHAPES])
def test_chunk_matches_naive_values_final_state_and_gradients(B, T, D, with_h0):
    x, log_a, h0 = random_inputs(B, T, D)
    h0 = h0 if with_h0 else None
    ref_h, ref_final, ref_grads = outputs_and_grads(dynamic_decay_naive, x, log_a, h0)
    h, final, grads = outputs_and_grads(dynamic_decay_chunk, x, log_a, h0, chunk_size=16)
    assert h.dtype == torch.float32 and h.shape == (B, T, D)
    assert_close("h", ref_h, h)
    assert_close("h_final", ref_final, final)
    for name, ref, got in zip(["dx", "dlog_a", "dh0"][: len(grads)], ref_grads, grads, strict=True):
        assert_close(name, ref, got)


@pytest.mark.parametrize("chunk_size", [2, 7, 64])
def test_chunk_matches_naive_for_several_chunk_sizes(chunk_size):
    x, log_a, h0 = random_inputs(2, 150, 9, seed=3)
    ref_h, ref_final, ref_grads = outputs_and_grads(dynamic_decay_naive, x, log_a, h0)
    h, final, grads = outputs_and_grads(dynamic_decay_chunk, x, log_a, h0, chunk_size=chunk_size)
    assert_close("h", ref_h, h)
    assert_close("h_final", ref_final, final)
    for name, ref, got in zip(["dx", "dlog_a", "dh0"][: len(grads)], ref_grads, grads, strict=True):
        assert_close(name, ref, got)


def test_split_sequence_with_carried_state_equals_unsplit():
    x, log_a, h0 = random_inputs(2, 130, 11, seed=4)
    whole, whole_final = dynamic_decay_chunk(x, log_a, h0, return_final=True, chunk_size=16)
    first, carry = dynamic_decay_chunk(x[:, :77], log_a[:, :77], h0, return_final=True, chunk_size=16)
    second, final = dynamic_decay_chunk(x[:, 77:], log_a[:, 77:], carry, return_final=True, chunk_size=16)
    assert_close("h", whole, torch.cat([first, second], 1))
    assert_close("h_final", whole_final, final)


def test_scan_is_stable_with_strong_decay_and_long_sequences():
    B, T, D = 1, 3000, 8
    x, _, h0 = random_inputs(B, T, D, seed=5)
    gen = torch.Generator().manual_seed(6)
    # mix of near-total forgetting (log a down to -1e4) and near-perfect memory (log a ≈ -1e-4)
    log_a = torch.where(torch.rand(B, T, D, generator=gen) < 0.3, -1e4, -1e-4).requires_grad_()
    ref_h, ref_final, ref_grads = outputs_and_grads(dynamic_decay_naive, x, log_a, h0)
    h, final, grads = outputs_and_grads(dynamic_decay_chunk, x, log_a, h0, chunk_size=64)
    assert torch.isfinite(h).all() and all(torch.isfinite(g).all() for g in grads)
    # long memories sum thousands of terms: float32 summation order alone differs by ~1e-5
    assert_close("h", ref_h, h, ratio=1e-4)
    assert_close("h_final", ref_final, final, ratio=1e-4)
    for name, ref, got in zip(["dx", "dlog_a", "dh0"][: len(grads)], ref_grads, grads, strict=True):
        assert_close(name, ref, got, ratio=1e-4)


def test_scan_rejects_mismatched_shapes_with_a_clear_message():
    with pytest.raises(ValueError, match="must both be"):
        dynamic_decay_chunk(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="h0 must be"):
        dynamic_decay_naive(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), torch.zeros(3))


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_spike_is_heaviside_forward_and_surrogate_backward(name):
    v = torch.linspace(-2, 2, 41, dtype=torch.float64).requires_grad_()
    z = spike(v, surrogate=name, alpha=2.0)
    assert torch.equal(z, (v >= 0).double())
    (grad,) = torch.autograd.grad(z.sum(), v)
    assert torch.allclose(grad, SURROGATES[name](v.detach(), 2.0))
    # every surrogate is the derivative of a smoothed step: it integrates to ~1
    fine = torch.linspace(-50, 50, 200001, dtype=torch.float64)
    assert abs(torch.trapezoid(SURROGATES[name](fine, 2.0), fine).item() - 1) < 0.02


def test_atan_surrogate_matches_the_analytic_formula():
    v = torch.tensor([-1.0, -0.1, 0.0, 0.3, 2.0], dtype=torch.float64, requires_grad=True)
    alpha = 3.0
    (grad,) = torch.autograd.grad(spike(v, "atan", alpha).sum(), v)
    expected = [alpha / 2 / (1 + (math.pi / 2 * alpha * u) ** 2) for u in v.tolist()]
    assert torch.allclose(grad, torch.tensor(expected, dtype=torch.float64))


def test_unknown_surrogate_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown surrogate"):
        spike(torch.zeros(3), surrogate="relu")


def test_integer_spikes_are_bounded_counts_with_one_surrogate_per_level():
    u = torch.tensor([-1.0, 0.5, 1.0, 2.7, 4.2, 99.0], requires_grad=True)
    counts = integer_spike(u, max_spikes=4)
    assert counts.tolist() == [0, 0, 1, 2, 4, 4]
    (grad,) = torch.autograd.grad(counts.sum(), u)
    expected = sum(SURROGATES["atan"](u.detach() - k, 2.0) for k in range(1, 5))
    assert torch.allclose(grad, expected)


def test_integer_mode_neuron_never_exceeds_max_spikes():
    torch.manual_seed(0)
    neuron = DynamicDecayNeuron(16, spike_mode="integer", max_spikes=3, threshold_init=0.05)
    spikes, membrane, _ = neuron(torch.randn(2, 40, 16) * 5)
    assert spikes.max() <= 3 and spikes.min() >= 0 and spikes.max() == 3
    assert torch.equal(spikes, spikes.round())


def test_lif_soft_reset_golden_trace():
    # beta 0.5, theta 1: v = 0.6 | 0.3+0.8=1.1 fire -> 0.1 | 0.05+0.3=0.35 | 0.175+1.5=1.675 fire -> 0.675
    #                    | 0.3375
    x = torch.tensor([0.6, 0.8, 0.3, 1.5, 0.0]).view(1, 5, 1)
    p = LIFParams(torch.tensor(0.5), torch.tensor(1.0))
    spikes, membrane, state = lif_scan(x, LIFState(torch.zeros(1, 1)), p)
    assert spikes.flatten().tolist() == [0, 1, 0, 1, 0]
    assert torch.allclose(membrane.flatten(), torch.tensor([0.6, 1.1, 0.35, 1.675, 0.3375]))
    assert torch.allclose(state.u.flatten(), torch.tensor([0.3375]))


NEURONS = {
    "lif": lambda: LIFNeuron(13, threshold_init=0.5),
    "dynamic-binary": lambda: DynamicDecayNeuron(13, chunk_size=8),
    "dynamic-integer": lambda: DynamicDecayNeuron(13, spike_mode="integer", chunk_size=8),
}


@pytest.mark.parametrize("kind", sorted(NEURONS))
def test_single_steps_equal_one_whole_sequence_forward(kind):
    torch.manual_seed(0)
    neuron = NEURONS[kind]()
    x = torch.randn(2, 37, 13, requires_grad=True)
    spikes, membrane, state = neuron(x)
    step_state, step_spikes, step_membranes = None, [], []
    for x_t in x.unbind(1):
        s, v, step_state = neuron.step(x_t, step_state)
        step_spikes.append(s)
        step_membranes.append(v)
    step_spikes, step_membranes = torch.stack(step_spikes, 1), torch.stack(step_membranes, 1)
    assert_close("membrane", membrane, step_membranes)
    # spikes may only differ where the membrane sits on the threshold to within rounding
    assert (spikes != step_spikes).float().mean() < 1e-3
    for got, ref in zip(step_state, state, strict=True):
        assert_close("state", ref, got)
    upstream = torch.randn(membrane.shape)
    loss = lambda s, v: (s * upstream).sum() + (v * upstream).sum()  # noqa: E731
    (whole_grad,) = torch.autograd.grad(loss(spikes, membrane), x)
    (step_grad,) = torch.autograd.grad(loss(step_spikes, step_membranes), x)
    assert_close("dx", whole_grad, step_grad, ratio=1e-4)


@pytest.mark.parametrize("kind", sorted(NEURONS))
def test_neuron_split_sequence_with_carried_state_equals_unsplit(kind):
    torch.manual_seed(1)
    neuron = NEURONS[kind]()
    x = torch.randn(3, 50, 13)
    spikes, membrane, state = neuron(x)
    s1, m1, carry = neuron(x[:, :21])
    s2, m2, final = neuron(x[:, 21:], carry)
    assert_close("membrane", membrane, torch.cat([m1, m2], 1))
    for got, ref in zip(final, state, strict=True):
        assert_close("state", ref, got)


def test_dynamic_neuron_gradients_reach_every_parameter():
    torch.manual_seed(2)
    neuron = DynamicDecayNeuron(8)
    spikes, membrane, _ = neuron(torch.randn(2, 30, 8))
    (spikes.sum() + membrane.pow(2).sum()).backward()
    for name, p in neuron.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dynamic_neuron_works_in_float32_under_half_inputs():
    torch.manual_seed(3)
    neuron = DynamicDecayNeuron(8)
    spikes, membrane, state = neuron(torch.randn(2, 20, 8).half())
    assert spikes.dtype == torch.float16 and membrane.dtype == torch.float32
    assert state.h.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spike_mode": "ternary"}, "spike_mode"),
        ({"surrogate": "nope"}, "unknown surrogate"),
        ({"chunk_size": 1}, "chunk_size"),
        ({"threshold_init": 0.0}, "threshold_init"),
        ({"max_spikes": 0}, "max_spikes"),
    ],
    ids=["mode", "surrogate", "chunk", "threshold", "max_spikes"],
)
def test_dynamic_neuron_rejects_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DynamicDecayNeuron(4, **kwargs)


def test_dynamic_neuron_recurrence_stays_float32_under_autocast():
    torch.manual_seed(4)
    neuron = DynamicDecayNeuron(8, chunk_size=4)
    x = torch.randn(2, 30, 8)
    _, reference, _ = neuron(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, membrane, state = neuron(x)
    assert membrane.dtype == torch.float32 and state.h.dtype == torch.float32
    assert_close("membrane", reference, membrane, ratio=1e-6)


# --- every plan of the fast paths against the naive loop --------------------------------------------------


@pytest.fixture(scope="session")
def compiled_kernel():
    """The C++ kernel, built once per session if no earlier run cached it (a minute or two of g++)."""
    from nord.neurons import fused

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    return fused.kernel(required=True)


def test_a_built_kernel_is_imported_from_the_cache_without_compiling(compiled_kernel, monkeypatch):
    from nord.neurons import fused

    monkeypatch.setattr(fused, "_loaded", {})  # as in a fresh process
    module = fused.kernel()
    assert module is not None and not fused._building
    assert module.__file__.startswith(str(fused.cache_directory()))


def test_kernel_falls_back_to_eager_with_one_warning_when_it_cannot_be_built(monkeypatch, tmp_path, caplog):
    from nord.neurons import fused

    for name, empty in (("_loaded", {}), ("_failures", {}), ("_building", set())):
        monkeypatch.setattr(fused, name, empty)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no kernel cached here
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    torch.manual_seed(5)
    neuron, x = DynamicDecayNeuron(6), torch.randn(2, 9, 6)
    monkeypatch.setenv("NORD_NEURON_KERNEL", "eager")
    _, reference, _ = neuron(x)
    monkeypatch.setenv("NORD_NEURON_KERNEL", "cpp")
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        with pytest.raises(RuntimeError, match="could not be built: no C"):
            neuron(x)
        monkeypatch.setenv("NORD_NEURON_KERNEL", "auto")
        for _ in range(2):
            _, membrane, _ = neuron(x)
            assert torch.equal(membrane, reference)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == len(caplog.records) == 1


def test_unknown_kernel_mode_is_an_error_naming_the_choices(monkeypatch):
    monkeypatch.setenv("NORD_NEURON_KERNEL", "gpu")
    with pytest.raises(ValueError, match="auto, cpp, eager"):
        DynamicDecayNeuron(4)(torch.randn(1, 3, 4))


PLANS = {  # (the CPU width from which the scan runs sequentially, the neuron's CPU tile in elements)
    "sequential-one-tile": (1, 2**40),
    "chunked-one-tile": (2**40, 2**40),
    "sequential-tiles": (1, 1),  # tiles of max(k − 1, 1) steps
    "uneven-tiles": (2**40, 150),  # 5 steps at B·D = 26, 3 at 39 (T never a multiple); wider: one tile
    "kernel": None,  # the compiled C++ kernel (nord.neurons.fused)
}


@pytest.fixture(params=sorted(PLANS))
def plan(request, monkeypatch):
    from nord.neurons import chunk, dynamic

    if PLANS[request.param] is None:
        request.getfixturevalue("compiled_kernel")
        monkeypatch.setenv("NORD_NEURON_KERNEL", "cpp")
        return request.param
    monkeypatch.setenv("NORD_NEURON_KERNEL", "eager")
    width, tile = PLANS[request.param]
    monkeypatch.setattr(chunk, "_CPU_SEQUENTIAL_MIN_WIDTH", width)
    monkeypatch.setattr(dynamic, "_CPU_TILE_ELEMENTS", tile)
    return request.param


SCAN_SHAPES = [(3, 1, 17), (3, 5, 17), (3, 16, 17), (3, 33, 17), (3, 47, 17), (2, 100, 1), (1, 2500, 3)]


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("B,T,D", SCAN_SHAPES, ids=[f"B{b}-T{t}-D{d}" for b, t, d in SCAN_SHAPES])
def test_every_scan_plan_matches_naive(plan, B, T, D, with_h0):
    x, log_a, h0 = random_inputs(B, T, D, seed=T)
    h0 = h0 if with_h0 else None
    ref_h, ref_final, ref_grads = outputs_and_grads(dynamic_decay_naive, x, log_a, h0)
    h, final, grads = outputs_and_grads(dynamic_decay_chunk, x, log_a, h0, chunk_size=4)
    ratio = 1e-4 if T > 1000 else 1e-5  # long memories: float32 summation order differs by ~1e-5
    assert_close("h", ref_h, h, ratio)
    assert_close("h_final", ref_final, final, ratio)
    for name, ref, got in zip(["dx", "dlog_a", "dh0"][: len(grads)], ref_grads, grads, strict=True):
        assert_close(name, ref, got, ratio)


def reference_membranes(x, window, weight, bias, h0):
    """The neuron's recurrence from its definition: conv over [window; X] by autograd, then the naive loop."""
    k, T = weight.shape[1], x.shape[1]
    padded = torch.cat([window, x], 1)
    z = bias + sum(padded[:, j : j + T] * weight[:, j] for j in range(k))
    a = torch.sigmoid(z)
    return dynamic_decay_naive((1 - a) * x, torch.nn.functional.logsigmoid(z), h0, return_final=True)[0]


NEURON_SHAPES = [
    (2, 1, 13, 4), (2, 2, 13, 4), (3, 9, 13, 4), (2, 33, 13, 4), (2, 64, 5, 4), (1, 700, 3, 4),
    (2, 33, 13, 1), (2, 1, 13, 2), (2, 33, 13, 2),
]  # fmt: skip


@pytest.mark.parametrize(
    "B,T,D,k", NEURON_SHAPES, ids=[f"B{b}-T{t}-D{d}-k{k}" for b, t, d, k in NEURON_SHAPES]
)
def test_neuron_membranes_match_the_naive_definition_in_every_plan(plan, B, T, D, k):
    """Output, final state, next window and the gradients of x, window, h0, conv weight, bias, threshold."""
    gen = torch.Generator().manual_seed(T)
    neuron = DynamicDecayNeuron(D, conv_kernel=k, chunk_size=4)
    with torch.no_grad():
        neuron.conv_weight.copy_(torch.randn(D, k, generator=gen))  # strong, varied decays
    x = torch.randn(B, T, D, generator=gen).requires_grad_()
    window = torch.randn(B, k - 1, D, generator=gen).requires_grad_()
    h0 = torch.randn(B, D, generator=gen).requires_grad_()
    spikes, h, state = neuron(x, DynamicDecayState(h0, window))
    ref_h = reference_membranes(x, window, neuron.conv_weight, neuron.conv_bias, h0)
    ref_spikes = spike(ref_h - neuron.threshold)
    ratio = 1e-4 if T > 500 else 1e-5
    assert_close("h", ref_h, h, ratio)
    assert_close("h_final", ref_h[:, -1], state.h, ratio)
    assert torch.equal(state.window, torch.cat([window, x], 1)[:, T:])
    ds, dh = torch.randn(h.shape, generator=gen), torch.randn(h.shape, generator=gen)
    inputs = [x, window, h0, neuron.conv_weight, neuron.conv_bias, neuron.threshold]
    names = ["dx", "dwindow", "dh0", "dconv_weight", "dconv_bias", "dthreshold"]
    grads = torch.autograd.grad((spikes * ds).sum() + (h * dh).sum() + state.h.sum(), inputs)
    ref_grads = torch.autograd.grad((ref_spikes * ds).sum() + (ref_h * dh).sum() + ref_h[:, -1].sum(), inputs)
    for name, ref, got in zip(names, ref_grads, grads, strict=True):
        assert_close(name, ref, got, ratio)


@pytest.mark.parametrize("tile_steps", [1, 3, 4, 64, "kernel"])
@pytest.mark.parametrize("T", [1, 2, 10])
def test_neuron_backward_matches_finite_differences(request, monkeypatch, tile_steps, T):
    """float64 gradcheck of the membranes H: the eager function in tiles of 1 to 64 steps, and the kernel."""
    from nord.neurons import dynamic

    if tile_steps != "kernel":
        monkeypatch.setattr(dynamic, "_CPU_TILE_ELEMENTS", tile_steps * 2 * 5)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, T, 5, generator=gen, dtype=torch.float64).requires_grad_()
    window = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.5).requires_grad_()
    bias = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 5, generator=gen, dtype=torch.float64).requires_grad_()
    fn = lambda *args: dynamic._DynamicDecay.apply(*args, 2)  # noqa: E731
    if tile_steps == "kernel":
        kernel = request.getfixturevalue("compiled_kernel")
        threshold = torch.randn(5, generator=gen, dtype=torch.float64)
        fn = lambda *args: dynamic._KernelNeuron.apply(*args, threshold, 2.0, kernel)[1]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, window, weight, bias, h0))


def test_the_kernel_build_finds_pip_ninja_off_path(monkeypatch, tmp_path):
    """torch runs `ninja` from PATH; the pip package's binary is found even when PATH lacks it."""
    import shutil

    from nord.neurons import fused

    monkeypatch.setenv("PATH", str(tmp_path))  # an empty dir: no ninja, as in an unactivated venv
    assert shutil.which("ninja") is None
    fused._find_ninja()
    assert shutil.which("ninja") is not None
