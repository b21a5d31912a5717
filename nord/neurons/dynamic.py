"""Dynamic-decay spiking neuron (Huang et al. 2026): no reset, input-dependent decay, parallel in time.

    z_t = b + Σ_{j<k} w_j ⊙ X_{t−k+1+j}      (causal depthwise conv over the last k inputs)
    a_t = σ(z_t)
    H_t = a_t · H_{t−1} + (1 − a_t) · X_t
    S_t = Θ(H_t − θ)                         binary (default), or
    S_t = clip(⌊H_t / θ⌋, 0, N)              integer spikes

a_t depends only on the inputs, so given X the recurrence is linear: training runs it over the whole
sequence with the chunked scan (`dynamic_decay_chunk`), generation one step at a time with O(1) state
(H plus the last k−1 inputs) and the same parameters. θ is a learned per-channel threshold; the spike
non-linearity has a surrogate gradient. Everything is computed in float32, also under fp16 autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nord.errors import ConfigError
from nord.neurons.chunk import dynamic_decay_chunk
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


class _DecayGates(torch.autograd.Function):
    """(log a, (1 − a)·X) from [window; X] with a hand-written backward: 2 full-size temporaries forward
    and ~3 + k backward, where autograd through the k taps would allocate ~4k (CPU time is allocation-bound).

    With a = σ(z):  d log a / dz = 1 − a,   d(1 − a)X / dz = −a(1 − a)X,   d(1 − a)X / dX = 1 − a.
    """

    @staticmethod
    def forward(ctx, x_padded: Tensor, weight: Tensor, bias: Tensor):
        k = weight.shape[1]
        T = x_padded.shape[1] - k + 1
        z = x_padded[:, :T] * weight[:, 0]  # (B, T, D)
        for j in range(1, k):  # k taps (a conv), not a loop over time
            z.addcmul_(x_padded[:, j : j + T], weight[:, j])
        z.add_(bias)
        log_a = F.logsigmoid(z)
        scaled = z.neg_().sigmoid_().mul_(x_padded[:, k - 1 :])  # (1 − a)·X, in z's memory
        ctx.save_for_backward(x_padded, weight, log_a)
        return log_a, scaled

    @staticmethod
    def backward(ctx, dlog_a: Tensor, dscaled: Tensor):
        x_padded, weight, log_a = ctx.saved_tensors
        k = weight.shape[1]
        T = log_a.shape[1]
        x = x_padded[:, k - 1 :]
        a = log_a.exp()
        dz = (dscaled * x).mul_(a).neg_().add_(dlog_a)  # dlog_a − dscaled·a·X, times (1 − a) below
        one_minus_a = a.neg_().add_(1)
        dz.mul_(one_minus_a)
        dx = torch.zeros_like(x_padded)
        dx[:, k - 1 :].addcmul_(dscaled, one_minus_a)
        dweight = torch.empty_like(weight)
        for j in range(k):
            dx[:, j : j + T].addcmul_(dz, weight[:, j])
            dweight[:, j] = (dz * x_padded[:, j : j + T]).sum((0, 1))
        return dx, dweight, dz.sum((0, 1))


def decay_gates(x_padded: Tensor, p: DynamicDecayParams) -> tuple[Tensor, Tensor]:
    """(log a_t, (1 − a_t)·X_t) for x_padded = [window; X] of shape (B, k−1+T, D); both (B, T, D)."""
    return _DecayGates.apply(x_padded, p.conv_weight, p.conv_bias)


def fire(h: Tensor, threshold: Tensor, cfg: SpikeConfig) -> Tensor:
    """Spikes from membranes H (…, D) and per-channel thresholds θ (D,)."""
    if cfg.mode == "binary":
        return spike(h - threshold, cfg.surrogate, cfg.alpha)
    u = h / threshold.clamp_min(_MIN_INTEGER_THRESHOLD)
    return integer_spike(u, cfg.max_spikes, cfg.surrogate, cfg.alpha)


def dynamic_decay_neuron_scan(
    x: Tensor, state: DynamicDecayState, p: DynamicDecayParams, cfg: SpikeConfig, chunk_size: int = 64
) -> tuple[Tensor, Tensor, DynamicDecayState]:
    """Whole sequence: x (B, T, D) -> (spikes (B, T, D), H (B, T, D), state after the last step)."""
    T = x.shape[1]
    x_padded = torch.cat([state.window, x.float()], 1)
    log_a, scaled = decay_gates(x_padded, p)
    h, h_final = dynamic_decay_chunk(scaled, log_a, state.h, True, chunk_size)
    # a copy of the window, not a view: a view would keep the whole (B, k−1+T, D) input alive with the state
    return fire(h, p.threshold, cfg), h, DynamicDecayState(h_final, x_padded[:, T:].clone())


def dynamic_decay_neuron_step(
    x_t: Tensor, state: DynamicDecayState, p: DynamicDecayParams, cfg: SpikeConfig
) -> tuple[Tensor, Tensor, DynamicDecayState]:
    """One token: x_t (B, D) -> (spikes (B, D), H_t (B, D), new state); O(1) in the position."""
    x_padded = torch.cat([state.window, x_t.float().unsqueeze(1)], 1)
    log_a, scaled = decay_gates(x_padded, p)
    h = log_a[:, 0].exp() * state.h + scaled[:, 0]
    return fire(h, p.threshold, cfg), h, DynamicDecayState(h, x_padded[:, 1:])


class DynamicDecayNeuron(nn.Module):
    """Dynamic-decay spiking layer over D channels; the module holds parameters, the functions compute.

    `forward(x (B, T, D), state=None) -> (spikes, membrane, state)` for training (parallel scan);
    `step(x_t (B, D), state) -> (spikes_t, membrane_t, state)` for generation. Spikes come back in
    x's dtype, membranes and state in float32. Initial decays σ(b) are spread over [0.5, 0.98] across
    channels (time constants of ~2 to ~50 tokens); conv taps start small so the decay starts near σ(b).
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
