"""Spike functions: Heaviside forward, surrogate derivative backward.

    spike(v)          = Θ(v)                     (1 where v ≥ 0)
    d spike / dv     ≈ g'(v)                     (the surrogate, chosen by name)
    integer_spike(u)  = Σ_{k=1..N} Θ(u − k) = clip(⌊u⌋, 0, N)   for u = H / θ
    d integer / du   ≈ Σ_{k=1..N} g'(u − k)

Surrogate derivatives g'(v; α), each integrating to 1 over v:
    atan      α / 2 / (1 + (π/2 · α · v)²)         (SpikingJelly's ATan; the default, α = 2)
    sigmoid   α · σ(αv) · (1 − σ(αv))
    triangle  α · max(0, 1 − α|v|)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from nord.errors import ConfigError


# In-place chains on one fresh tensor: CPU backward time is dominated by full-size allocations.
def _atan(v: Tensor, alpha: float) -> Tensor:
    scale = math.pi / 2 * alpha
    return torch.addcmul(v.new_ones(()), v, v, value=scale * scale).reciprocal_().mul_(alpha / 2)


def _sigmoid(v: Tensor, alpha: float) -> Tensor:
    s = (v * alpha).sigmoid_()
    return (1 - s).mul_(s).mul_(alpha)


def _triangle(v: Tensor, alpha: float) -> Tensor:
    return v.abs().mul_(-alpha).add_(1).clamp_min_(0).mul_(alpha)


SURROGATES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "atan": _atan,
    "sigmoid": _sigmoid,
    "triangle": _triangle,
}


def check_surrogate(name: str, alpha: float) -> None:
    """Raise `ConfigError` unless `name` is a known surrogate and `alpha` > 0."""
    if name not in SURROGATES:
        raise ConfigError(f"unknown surrogate {name!r}; choose one of {sorted(SURROGATES)}")
    if not alpha > 0:
        raise ConfigError(f"surrogate alpha must be > 0, got {alpha}")


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, surrogate: str, alpha: float) -> Tensor:
        ctx.save_for_backward(v)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return torch.ge(v, 0, out=torch.empty_like(v))  # straight to v's dtype: a bool copy costs ~5 passes

    @staticmethod
    def backward(ctx, grad: Tensor):
        (v,) = ctx.saved_tensors
        return SURROGATES[ctx.surrogate](v, ctx.alpha).mul_(grad), None, None


class _IntegerSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, max_spikes: int, surrogate: str, alpha: float) -> Tensor:
        ctx.save_for_backward(u)
        ctx.max_spikes, ctx.surrogate, ctx.alpha = max_spikes, surrogate, alpha
        return u.floor().clamp(0, max_spikes)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (u,) = ctx.saved_tensors
        derivative = SURROGATES[ctx.surrogate]
        slope = derivative(u - 1, ctx.alpha)
        for k in range(2, ctx.max_spikes + 1):
            slope.add_(derivative(u - k, ctx.alpha))
        return slope.mul_(grad), None, None, None


def spike(v: Tensor, surrogate: str = "atan", alpha: float = 2.0) -> Tensor:
    """Binary spikes Θ(v) (1 where v ≥ 0) with the named surrogate gradient.

    Args:
        v: membrane minus threshold, any shape.
        surrogate: a key of `SURROGATES`.
        alpha: surrogate sharpness (larger = narrower, closer to the true Heaviside).
    Returns:
        spikes in {0, 1}, same shape and dtype as `v`.

    Example: `spike(h - theta)` for H of shape (B, T, D) and theta of shape (D,).
    """
    check_surrogate(surrogate, alpha)
    return _Spike.apply(v, surrogate, alpha)


def integer_spike(u: Tensor, max_spikes: int = 4, surrogate: str = "atan", alpha: float = 2.0) -> Tensor:
    """Spike counts clip(⌊u⌋, 0, max_spikes) for u = H/θ, one surrogate per crossed level.

    Args:
        u: membrane divided by a positive threshold, any shape.
        max_spikes: N, the largest count a neuron emits in one step.
    Returns:
        counts in {0, …, N} (float, same dtype as `u`).
    """
    check_surrogate(surrogate, alpha)
    if max_spikes < 1:
        raise ConfigError(f"max_spikes must be >= 1, got {max_spikes}")
    return _IntegerSpike.apply(u, max_spikes, surrogate, alpha)
