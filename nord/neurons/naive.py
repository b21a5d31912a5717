"""Reference linear recurrence of the dynamic-decay neuron: a float32 loop over time (the spec).

    h_t = exp(log_a_t) · h_{t−1} + x_t,     h_{−1} = h0 (or 0)

With a_t = σ(z_t) the neuron passes `log_a = logsigmoid(z)` and the already-scaled input
`x = (1 − a_t) · X_t`, which gives H_t = a_t·H_{t−1} + (1 − a_t)·X_t (fla's HGRN contract, gate in log
space). Thresholds apply to h afterwards; this function is only the recurrence.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_scan_inputs(x: Tensor, log_a: Tensor, h0: Tensor | None) -> None:
    """Raise `ValueError` with the expected shapes unless x, log_a are (B, T, D) and h0 is (B, D)."""
    if x.dim() != 3 or x.shape != log_a.shape:
        raise ValueError(f"x and log_a must both be (B, T, D); got {tuple(x.shape)} and {tuple(log_a.shape)}")
    if x.shape[1] < 1:
        raise ValueError("the sequence is empty (T = 0); pass at least one time step")
    if h0 is not None and h0.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"h0 must be (B, D) = {(x.shape[0], x.shape[2])}, got {tuple(h0.shape)}")


def dynamic_decay_naive(
    x: Tensor, log_a: Tensor, h0: Tensor | None = None, return_final: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Run h_t = exp(log_a_t)·h_{t−1} + x_t step by step in float32.

    Args:
        x: (B, T, D) input, already scaled by (1 − a_t) by the caller.
        log_a: (B, T, D) log-decays (≤ 0 for a decaying state).
        h0: (B, D) initial state, zeros if None.
        return_final: also return h_{T−1}.
    Returns:
        h: (B, T, D) float32; h_final: (B, D) float32 or None.

    Example: `h, _ = dynamic_decay_naive((1 - a) * X, a.log())`.
    """
    check_scan_inputs(x, log_a, h0)
    h = x.new_zeros(x.shape[0], x.shape[2], dtype=torch.float32) if h0 is None else h0.float()
    decays = log_a.float().exp()
    states = []
    # unbind, not x[:, t]: indexing a grad-requiring tensor in the loop makes backward O(T²)
    for x_t, a_t in zip(x.float().unbind(1), decays.unbind(1), strict=True):
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, 1), (h if return_final else None)
