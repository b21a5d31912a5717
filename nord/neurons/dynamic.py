"""Dynamic-decay spiking neuron (Huang et al. 2026): no reset, input-dependent decay, parallel in time.

    z_t = b + Σ_{j<k} w_j ⊙ X_{t−k+1+j}      (causal depthwise conv over the last k inputs)
    a_t = σ(z_t)
    H_t = a_t · H_{t−1} + (1 − a_t) · X_t
    S_t = Θ(H_t − θ)                         binary (default), or
    S_t = clip(⌊H_t / θ⌋, 0, N)              integer spikes

a_t depends only on the inputs, so given X the recurrence is linear: training runs gates and scan over the
whole sequence in one autograd function (`_DynamicDecay`, on the in-place scans of `chunk.py`), generation
the same function one token at a time with O(1) state (H plus the last k−1 inputs). θ is a learned
per-channel threshold; the spike non-linearity has a surrogate gradient. Everything is computed in float32,
also under fp16 autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from nord.errors import ConfigError
from nord.neurons import fused
from nord.neurons.chunk import scan_
from nord.neurons.surrogate import check_surrogate, integer_spike, spike

SPIKE_MODES = ("binary", "integer")
_MIN_INTEGER_THRESHOLD = 1e-3  # integer spikes divide by θ


class DynamicDecayParams(NamedTuple):
    """conv_weight (D, k): taps, oldest first; conv_bias (D,); threshold θ (D,)."""

    conv_weight: Tensor
    conv_bias: Tensor
    threshold: Tensor


class DynamicDecayState(NamedTuple):
    """h: (B, D) float32 membrane H_{t−1}; window: (B, k−1, D) float32 last inputs, oldest first."""

    h: Tensor
    window: Tensor

    def detach(self) -> DynamicDecayState:
        return DynamicDecayState(self.h.detach(), self.window.detach())


class SpikeConfig(NamedTuple):
    mode: str = "binary"
    max_spikes: int = 4
    surrogate: str = "atan"
    alpha: float = 2.0


# On a CPU the neuron works through time in tiles of about this many elements (512 KiB of float32, within a
# core's L2 cache): gates, scan and backward of a tile then run in cache, ~20 small ops per tile in place of
# ~30 passes over memory (bench/neurons.py). On CUDA one tile covers the whole sequence.
_CPU_TILE_ELEMENTS = 2**17


def _tile_length(x: Tensor, k: int, chunk_size: int) -> int:
    B, T, D = x.shape
    steps = _CPU_TILE_ELEMENTS // (B * D)
    if x.device.type != "cpu" or steps > 2 * chunk_size:  # narrow: a tile would scan in chunks, ~2C steps
        return T  # each, so many tiles would cost more Python steps than their cache saves
    return max(k - 1, 1, min(T, steps))


def _kernel_for(x: Tensor, cfg: SpikeConfig):
    """The compiled CPU kernel (`nord.neurons.fused`) where it applies (CPU, binary spikes with the ATan
    surrogate: every recipe's) and `NORD_NEURON_KERNEL` allows it; None for the eager path."""
    if x.device.type != "cpu" or cfg.mode != "binary" or cfg.surrogate != "atan":
        return None
    mode = fused.kernel_mode()
    return None if mode == "eager" else fused.kernel(required=mode == "cpp")


class _KernelNeuron(torch.autograd.Function):
    """(spikes, H) from X, the window, the conv, h0 and θ through the C++ kernel: `_DynamicDecay` and
    `fire` (binary, ATan) in one forward and one backward pass. Keeps X, a and H for backward."""

    @staticmethod
    def forward(ctx, x, window, weight, bias, h0, threshold, alpha: float, kernel):
        ctx.x_dtype, ctx.alpha, ctx.kernel = x.dtype, alpha, kernel
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for gradcheck
        x, window, bias, h0, threshold = (t.to(dtype).contiguous() for t in (x, window, bias, h0, threshold))
        taps = weight.to(dtype).t().contiguous()
        a, h, spikes = kernel.neuron_forward(x, window, taps, bias, h0, threshold)
        ctx.save_for_backward(x, window, taps, a, h, h0, threshold)
        return spikes, h

    @staticmethod
    def backward(ctx, ds: Tensor, dh: Tensor):
        x, window, taps, a, h, h0, threshold = ctx.saved_tensors
        ds, dh = (t.to(x.dtype).contiguous() for t in (ds, dh))
        grads = ctx.kernel.neuron_backward(dh, ds, x, window, taps, a, h, h0, threshold, ctx.alpha)
        dx, dwindow, dtaps, dbias, dthreshold, dh0 = grads
        return dx.to(ctx.x_dtype), dwindow, dtaps.t(), dbias, dh0, dthreshold, None, None


def _conv_into(out: Tensor, ext: Tensor, taps: Tensor, bias: Tensor) -> Tensor:
    """out (B, τ, D) = b + Σ_j w_j ⊙ ext[:, t + j] for ext = [the k−1 inputs before the tile; the tile]."""
    k, tau = taps.shape[0], out.shape[1]
    torch.addcmul(bias, ext[:, k - 1 :], taps[k - 1], out=out)
    for j in range(k - 1):  # k taps (a conv), not a loop over time
        out.addcmul_(ext[:, j : j + tau], taps[j])
    return out


class _DynamicDecay(torch.autograd.Function):
    """Membranes H (B, T, D) from X, the window, the conv (weight (D, k), bias) and h0, tile by tile in time.

    Forward: z = conv([window; X]) + b, a = σ(z), H = scan of a_t·H_{t−1} + (1 − a_t)·X_t from h0.
    Backward, with g_t = dH_t + a_{t+1}·g_{t+1} (the adjoint scan, tiles in reverse):
        dX_t (direct) = (1 − a_t)·g_t,   dz_t = g_t·(H_{t−1} − X_t)·a_t(1 − a_t),   dh0 = a_0·g_0,
    and the conv's transpose: d[window; X]_e += Σ_j w_j dz_{e−j}, dw_j = Σ dz_t [window; X]_{t+j}, db = Σ dz.
    Keeps X, a and H (three tensors the size of X) for backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, window: Tensor, weight: Tensor, bias: Tensor, h0: Tensor, chunk_size: int):
        ctx.chunk_size, ctx.x_dtype = chunk_size, x.dtype
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for gradcheck
        x, window, weight, bias, h0 = (t.to(dtype) for t in (x, window, weight, bias, h0))
        T, tau = x.shape[1], _tile_length(x, weight.shape[1], chunk_size)
        taps = weight.t().contiguous()  # (k, D): a strided tap would defeat vectorisation over D
        a, h = torch.empty_like(x), torch.empty_like(x)
        before, state = window, h0  # the k−1 inputs and the state before the tile
        for t0 in range(0, T, tau):
            t1 = min(t0 + tau, T)
            x_t, a_t, h_t = x[:, t0:t1], a[:, t0:t1], h[:, t0:t1]
            ext = torch.cat([before, x_t], 1)
            _conv_into(a_t, ext, taps, bias).sigmoid_()
            torch.addcmul(x_t, a_t, x_t, value=-1, out=h_t)  # (1 − a)·X, then the scan in place
            scan_(h_t, a_t, state, chunk_size=chunk_size)
            before, state = ext[:, t1 - t0 :], h_t[:, -1]
        ctx.save_for_backward(x, window, weight, a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        x, window, weight, a, h, h0 = ctx.saved_tensors
        (B, T, D), k = x.shape, weight.shape[1]
        tau = _tile_length(x, k, ctx.chunk_size)
        taps = weight.t().contiguous()
        dx, dtaps, dbias = torch.empty_like(x), torch.zeros_like(taps), torch.zeros_like(h0[0])
        dz_after = x.new_zeros(B, k - 1, D)  # dz of the k−1 steps after the tile (0 past the end)
        g_after = None  # g of the step after the tile
        for t0 in reversed(range(0, T, tau)):
            t1 = min(t0 + tau, T)
            a_t, x_t = a[:, t0:t1], x[:, t0:t1]
            g = dx[:, t0:t1].copy_(dh[:, t0:t1])  # g, then (1 − a)·g + the conv's transpose: dX
            if g_after is not None:
                g[:, -1].addcmul_(a[:, t1], g_after)
            if t1 - t0 > 1:
                scan_(g[:, :-1], a[:, t0 + 1 : t1], g[:, -1], chunk_size=ctx.chunk_size, reverse=True)
            g_after = g[:, 0].clone()
            dz = torch.empty_like(x_t)  # g·(H_{t−1} − X_t)·a·(1 − a)
            torch.sub(h[:, t0 : t1 - 1], x_t[:, 1:], out=dz[:, 1:])
            torch.sub(h0 if t0 == 0 else h[:, t0 - 1], x_t[:, 0], out=dz[:, 0])
            dz.mul_(g).mul_(a_t)
            dz.addcmul_(dz, a_t, value=-1)
            g.addcmul_(g, a_t, value=-1)
            dz_ext = torch.cat([dz, dz_after], 1)
            ext = torch.cat([window if t0 == 0 else x[:, t0 - k + 1 : t0], x_t], 1)
            product = torch.empty_like(dz)
            for j in range(k):
                g.addcmul_(dz_ext[:, k - 1 - j : k - 1 - j + t1 - t0], taps[j])
                dtaps[j] += torch.mul(dz, ext[:, j : j + t1 - t0], out=product).sum((0, 1))
            dbias += dz.sum((0, 1))
            dz_after = dz_ext[:, : k - 1]
        dwindow = torch.zeros_like(window)  # window slot e < k−1 took part in z_{e−j} through tap j
        for j in range(k - 1):
            dwindow[:, j:].addcmul_(dz_after[:, : k - 1 - j], taps[j])
        return dx.to(ctx.x_dtype), dwindow, dtaps.t(), dbias, g_after * a[:, 0], None


def fire(h: Tensor, threshold: Tensor, cfg: SpikeConfig) -> Tensor:
    """Spikes from membranes H (…, D) and per-channel thresholds θ (D,)."""
    if cfg.mode == "binary":
        return spike(h - threshold, cfg.surrogate, cfg.alpha)
    u = h / threshold.clamp_min(_MIN_INTEGER_THRESHOLD)
    return integer_spike(u, cfg.max_spikes, cfg.surrogate, cfg.alpha)


def membranes(x: Tensor, state: DynamicDecayState, p: DynamicDecayParams, chunk_size: int = 64) -> Tensor:
    """Membranes H (B, T, D) for inputs x (B, T, D) from `state`, in float32 (see `_DynamicDecay`)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _DynamicDecay.apply(x, state.window, p.conv_weight, p.conv_bias, state.h, chunk_size)


def next_window(window: Tensor, x: Tensor) -> Tensor:
    """The last k−1 inputs of [window; x] (a copy: a view would keep all of x alive with the state)."""
    T = x.shape[1]
    return torch.cat([window[:, T:], x[:, max(0, T - window.shape[1]) :].to(window.dtype)], 1)


def spikes_and_membranes(
    x: Tensor, state: DynamicDecayState, p: DynamicDecayParams, cfg: SpikeConfig, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """(spikes, H), each (B, T, D) float32, through the compiled kernel where it applies, else eager."""
    kernel = _kernel_for(x, cfg)
    if kernel is None:
        h = membranes(x, state, p, chunk_size)
        return fire(h, p.threshold, cfg), h
    with torch.autocast(device_type=x.device.type, enabled=False):
        args = (x, state.window, p.conv_weight, p.conv_bias, state.h, p.threshold, cfg.alpha, kernel)
        return _KernelNeuron.apply(*args)


def dynamic_decay_neuron_scan(
    x: Tensor, state: DynamicDecayState, p: DynamicDecayParams, cfg: SpikeConfig, chunk_size: int = 64
) -> tuple[Tensor, Tensor, DynamicDecayState]:
    """Whole sequence: x (B, T, D) -> (spikes (B, T, D), H (B, T, D), state after the last step)."""
    s, h = spikes_and_membranes(x, state, p, cfg, chunk_size)
    return s, h, DynamicDecayState(h[:, -1].clone(), next_window(state.window, x))


def dynamic_decay_neuron_step(
    x_t: Tensor, state: DynamicDecayState, p: DynamicDecayParams, cfg: SpikeConfig
) -> tuple[Tensor, Tensor, DynamicDecayState]:
    """One token: x_t (B, D) -> (spikes (B, D), H_t (B, D), new state); O(1) in the position."""
    x = x_t.unsqueeze(1)
    s, h = spikes_and_membranes(x, state, p, cfg)
    return s[:, 0], h[:, 0], DynamicDecayState(h[:, 0], next_window(state.window, x))


class DynamicDecayNeuron(nn.Module):
    """Dynamic-decay spiking layer over D channels; the module holds parameters, the functions compute.

    `forward(x (B, T, D), state=None) -> (spikes, membrane, state)` for training (parallel scan);
    `step(x_t (B, D), state) -> (spikes_t, membrane_t, state)` for generation. Spikes come back in
    x's dtype, membranes and state in float32. Initial decays σ(b) are spread over [0.5, 0.98] across
    channels (time constants of ~2 to ~50 tokens; log-spaced ones up to ~1,000 tokens scored worse in
    bench/length.py, docs/benchmarks/quality.md); conv taps start small so the decay starts near σ(b).
    """

    def __init__(
        self,
        dim: int,
        *,
        conv_kernel: int = 4,
        threshold_init: float = 0.1,
        spike_mode: str = "binary",
        max_spikes: int = 4,
        surrogate: str = "atan",
        alpha: float = 2.0,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if dim < 1 or conv_kernel < 1:
            raise ConfigError(f"dim and conv_kernel must be >= 1, got {dim} and {conv_kernel}")
        if spike_mode not in SPIKE_MODES:
            raise ConfigError(f"spike_mode must be one of {SPIKE_MODES}, got {spike_mode!r}")
        if max_spikes < 1:
            raise ConfigError(f"max_spikes must be >= 1, got {max_spikes}")
        if chunk_size < 2:
            raise ConfigError(f"chunk_size must be >= 2, got {chunk_size}")
        if not threshold_init > 0:
            raise ConfigError(f"threshold_init must be > 0, got {threshold_init}")
        check_surrogate(surrogate, alpha)
        self.dim, self.conv_kernel, self.chunk_size = dim, conv_kernel, chunk_size
        self.spike_config = SpikeConfig(spike_mode, max_spikes, surrogate, alpha)
        self.conv_weight = nn.Parameter(torch.randn(dim, conv_kernel) * (0.1 / conv_kernel**0.5))
        self.conv_bias = nn.Parameter(torch.logit(torch.linspace(0.5, 0.98, dim)))
        self.threshold = nn.Parameter(torch.full((dim,), float(threshold_init)))

    def params(self) -> DynamicDecayParams:
        return DynamicDecayParams(self.conv_weight.float(), self.conv_bias.float(), self.threshold.float())

    def init_state(self, batch_size: int, device=None, dtype=None) -> DynamicDecayState:
        dtype = dtype or torch.float32
        return DynamicDecayState(
            torch.zeros(batch_size, self.dim, device=device, dtype=dtype),
            torch.zeros(batch_size, self.conv_kernel - 1, self.dim, device=device, dtype=dtype),
        )

    def _state(self, state: DynamicDecayState | None, batch_size: int, device) -> DynamicDecayState:
        state = state or self.init_state(batch_size, device)
        return DynamicDecayState(state.h.float(), state.window.float())

    def forward(
        self, x: Tensor, state: DynamicDecayState | None = None
    ) -> tuple[Tensor, Tensor, DynamicDecayState]:
        state = self._state(state, x.shape[0], x.device)
        s, h, state = dynamic_decay_neuron_scan(x, state, self.params(), self.spike_config, self.chunk_size)
        return s.to(x.dtype), h, state

    def step(
        self, x_t: Tensor, state: DynamicDecayState | None = None
    ) -> tuple[Tensor, Tensor, DynamicDecayState]:
        state = self._state(state, x_t.shape[0], x_t.device)
        s, h, state = dynamic_decay_neuron_step(x_t, state, self.params(), self.spike_config)
        return s.to(x_t.dtype), h, state
