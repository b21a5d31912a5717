"""Leaky integrate-and-fire neuron with soft reset (the sequential baseline).

    v_t = β · u_{t−1} + x_t          (membrane before the spike check)
    z_t = Θ(v_t − θ)                 (spike; surrogate gradient backward)
    u_t = v_t − θ · z_t              (soft reset: subtract the threshold, keep the excess)

β ∈ (0, 1) is the per-step decay (1 − dt/τ_mem), θ the threshold, both per channel. The reset makes
u_t depend on z_t, so there is no parallel form: `lif_scan` is one Python loop over time.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from nord.errors import ConfigError
from nord.neurons.surrogate import check_surrogate, spike


class LIFParams(NamedTuple):
    """beta: decay per step, (D,) or scalar; threshold: θ, (D,) or scalar."""

    beta: Tensor
    threshold: Tensor


class LIFState(NamedTuple):
    """u: (B, D) float32 membrane after the reset of the last step."""

    u: Tensor

    def detach(self) -> LIFState:
        return LIFState(self.u.detach())


def lif_step(
    x_t: Tensor, state: LIFState, p: LIFParams, surrogate: str = "atan", alpha: float = 2.0
) -> tuple[Tensor, Tensor, LIFState]:
    """One step: x_t (B, D) -> (spikes z_t (B, D), membrane v_t (B, D) before reset, new state)."""
    v = p.beta * state.u + x_t.float()
    z = spike(v - p.threshold, surrogate, alpha)
    return z, v, LIFState(v - p.threshold * z)


def lif_scan(
    x: Tensor, state: LIFState, p: LIFParams, surrogate: str = "atan", alpha: float = 2.0
) -> tuple[Tensor, Tensor, LIFState]:
    """`lif_step` over time: x (B, T, D) -> (spikes (B, T, D), membranes (B, T, D), final state)."""
    spikes, membranes = [], []
    for x_t in x.unbind(1):  # unbind, never x[:, t]: keeps backward O(T)
        z, v, state = lif_step(x_t, state, p, surrogate, alpha)
        spikes.append(z)
        membranes.append(v)
    return torch.stack(spikes, 1), torch.stack(membranes, 1), state


class LIFNeuron(nn.Module):
    """LIF layer with learned per-channel decay β = σ(decay_logit) and threshold θ.

    `forward(x (B, T, D), state=None) -> (spikes, membrane, state)`, `step(x_t (B, D), state)` likewise
    for one token. Spikes come back in x's dtype, membranes and state in float32.
    """

    def __init__(
        self,
        dim: int,
        *,
        beta_init: float = 0.9,
        threshold_init: float = 1.0,
        surrogate: str = "atan",
        alpha: float = 2.0,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ConfigError(f"dim must be >= 1, got {dim}")
        if not 0 < beta_init < 1:
            raise ConfigError(f"beta_init must be in (0, 1), got {beta_init}")
        check_surrogate(surrogate, alpha)
        self.dim, self.surrogate, self.alpha = dim, surrogate, alpha
        self.decay_logit = nn.Parameter(torch.full((dim,), math.log(beta_init / (1 - beta_init))))
        self.threshold = nn.Parameter(torch.full((dim,), float(threshold_init)))

    def params(self) -> LIFParams:
        return LIFParams(torch.sigmoid(self.decay_logit.float()), self.threshold.float())

    def init_state(self, batch_size: int, device=None, dtype=None) -> LIFState:
        return LIFState(torch.zeros(batch_size, self.dim, device=device, dtype=dtype or torch.float32))

    def forward(self, x: Tensor, state: LIFState | None = None) -> tuple[Tensor, Tensor, LIFState]:
        state = state or self.init_state(x.shape[0], x.device)
        z, v, state = lif_scan(x, state, self.params(), self.surrogate, self.alpha)
        return z.to(x.dtype), v, state

    def step(self, x_t: Tensor, state: LIFState | None = None) -> tuple[Tensor, Tensor, LIFState]:
        state = state or self.init_state(x_t.shape[0], x_t.device)
        z, v, state = lif_step(x_t, state, self.params(), self.surrogate, self.alpha)
        return z.to(x_t.dtype), v, state
