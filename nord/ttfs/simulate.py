"""Time-to-first-spike layers: the event-driven simulation (the spec) and its closed form (fast).

Times are in value units (τ_c = 1). Layer n fires in its window [t_min^n, t_max^n] of length T_n, and the
windows are consecutive: t_min^n = t_max^{n−1}. Neuron i's membrane (V_i = 0 when the input window opens):

    dV_i/dt = Σ_j W_ij Θ(t − t_j)          t < t_min^n     linear PSPs, slope W_ij from each arrived spike
    dV_i/dt ← 1                            at t = t_min^n  slope at threshold fixed to 1 (linear mappability)

The slope reset is Stanojevic et al.'s base slope α_i = 1 − Σ_j W_ij switched on at t_min^n, with inputs
that stayed silent arriving at t_max^{n−1} (their forced spike carries the value 0): the neuron sets its own
slope, it is not a spike and is not counted. A later input (t_j > t_min^n) adds W_ij to the slope from
t_j on. The neuron fires once, at the first t ∈ [t_min^n, t_max^n) with V_i(t) ≥ ϑ_n = T_n, or never.
With the code x = t_max − t (an earlier spike is a larger value; a silent neuron is 0) and every input
inside its own window:

    V_i(t_min^n) = Σ_j W_ij x_j = z_i   ⇒   t_max^n − t_i = clip(z_i, 0, T_n)        (a ReLU if T_n ≥ z_i)

A non-spiking read-out neuron integrates the same PSPs and is read when the window closes: y = V(t_max).
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")
EVENT_ELEMENTS = 4_000_000  # (tokens × events × neurons) per chunk of the event simulation


def _chunks(n: int, per_token: int) -> list[slice]:
    size = max(1, EVENT_ELEMENTS // max(1, per_token))
    return [slice(s, s + size) for s in range(0, n, size)]


def _sorted_events(times: Tensor, weights: Tensor, t_fill: float) -> tuple[Tensor, Tensor]:
    """Spikes of each token in time order: times (N, K) -> (N, k) times, (N, k, F) synaptic slopes.

    Silent inputs (inf) sort last, are cut once no token of the chunk has more spikes, and else become
    zero-weight events at `t_fill` (at or after the last real one, so the order holds).
    """
    t, order = times.sort(dim=1, stable=True)  # (N, K)
    k = int(torch.isfinite(t).sum(dim=1).max())
    t, order = t[:, :k], order[:, :k]
    live = torch.isfinite(t)
    w = weights[order] * live[..., None]  # (N, k, F) a silent input has no PSP
    return torch.where(live, t, t_fill), w


def fire_events(
    times: Tensor, weights: Tensor, *, t_open: float, t_close: float, threshold: float
) -> tuple[Tensor, Tensor]:
    """Event-driven TTFS layer: input spike times -> each neuron's single spike time (inf = silent).

    Events (input spikes and each neuron's slope reset at `t_open`) are processed in time order; between
    two events the membrane is linear, V(t) = S_k t − Q_k with S_k, Q_k the running sums of W and W·t_j
    (the reset included), and every segment inside [t_open, t_close) is solved for its threshold
    crossing; a neuron fires at the earliest one (already above threshold when the window opens: it
    fires at `t_open`, saturated).

    Args:
        times: (N, K) float64 input spike times (at most t_close), inf for a silent input.
        weights: (K, F) slope each input adds to each neuron's membrane.
        t_open, t_close: the layer's window; threshold: ϑ (= t_close − t_open for the ReLU mapping).
    Returns:
        (N, F) spike times in [t_open, t_close) or inf, and (N, F) membrane potentials at `t_open`.
    """
    n, f = times.shape[0], weights.shape[1]
    spikes = times.new_full((n, f), INF)
    v_open = times.new_zeros(n, f)
    for s in _chunks(n, times.shape[1] * f):
        t, w = _sorted_events(times[s], weights, t_close)  # (c, k), (c, k, F)
        c = t.shape[0]
        early = t <= t_open  # a spike at the very edge arrived with the window (it carries 0)
        # Up to the window: the membrane is linear between events with slope S_k, the running sum of W.
        after = torch.cat([t[:, 1:], t.new_full((c, 1), INF)], dim=1)
        gaps = (after.clamp_max(t_open) - t).clamp_min(0) * early  # (c, k)
        v = ((w * early[..., None]).cumsum(dim=1) * gaps[..., None]).sum(dim=1)  # (c, F) V(t_open)
        # From t_open: the slope reset (an event of its own at t_open), then the late inputs. Segments
        # before the window are empty once clipped to it, so the search starts at the last early event.
        first = max(0, int(early.sum(dim=1).min()) - 1)
        t = torch.cat([t.new_full((c, 1), t_open), t[:, first:]], dim=1)  # (c, m)
        w = torch.cat([w.new_zeros(c, 1, f), w[:, first:] * ~early[:, first:, None]], dim=1)  # (c, m, F)
        slope = 1 + w.cumsum(dim=1)  # S_k on segment [t_k, t_{k+1}): V(t) = S_k t − Q_k
        intercept = t_open - v[:, None] + (w * t[..., None]).cumsum(dim=1)  # Q_k
        ends = torch.cat([t[:, 1:], t.new_full((c, 1), t_close)], dim=1)
        lo = t.clamp_min(t_open)[..., None]  # (c, m, 1) the part of each segment inside the window
        hi = ends.clamp_max(t_close)[..., None]
        v_lo = slope * lo - intercept  # (c, m, F)
        rise = torch.where(slope > 0, (threshold - v_lo) / slope.clamp_min(1e-300), INF)
        cross = torch.where(v_lo >= threshold, lo, lo + rise)
        spikes[s] = torch.where((lo < hi) & (cross < hi), cross, INF).min(dim=1).values
        v_open[s] = v
    return spikes, v_open


def read_out_events(times: Tensor, weights: Tensor, *, t_close: float) -> Tensor:
    """Non-spiking read-out: V(t_close) = Σ_k S_k (t_{k+1} − t_k) integrated over time-ordered spikes.

    times (N, K) float64 spike times (inf = silent), weights (K, D) -> (N, D) membrane at `t_close`.
    """
    n, d = times.shape[0], weights.shape[1]
    out = times.new_zeros(n, d)
    for s in _chunks(n, times.shape[1] * d):
        t, w = _sorted_events(times[s], weights, t_close)  # (c, k), (c, k, D)
        gaps = torch.diff(t, dim=1, append=t.new_full((t.shape[0], 1), t_close))  # (c, k)
        out[s] = (w.cumsum(dim=1) * gaps[..., None]).sum(dim=1)
    return out


def fire_closed(
    times: Tensor, weights: Tensor, *, t_open: float, t_close: float, threshold: float
) -> tuple[Tensor, Tensor]:
    """`fire_events` in closed form, valid when every input spike is at or before `t_open` (the layered
    windows guarantee it): V(t_open) = Σ_j W_ij (t_open − t_j), then slope 1 up to the threshold."""
    x = torch.where(torch.isfinite(times), t_open - times, 0.0)  # (N, K)
    v_open = x @ weights  # (N, F)
    t = t_open + (threshold - v_open).clamp_min(0)
    return torch.where(t < t_close, t, INF), v_open


def read_out_closed(times: Tensor, weights: Tensor, *, t_close: float) -> Tensor:
    """`read_out_events` in closed form: Σ_j W_j (t_close − t_j) over the spikes."""
    return torch.where(torch.isfinite(times), t_close - times, 0.0) @ weights


def quantize_times(t: Tensor, *, t_open: float, step: float | None, t_close: float) -> Tensor:
    """Spike times on the window's clock: the first tick at or after t; a spike that lands on t_close
    carries 0 and is not sent (inf)."""
    if step is None:
        return t
    ticks = torch.ceil((t - t_open) / step)
    q = t_open + ticks * step
    return torch.where(q < t_close - step / 2, q, INF)


def jitter_times(
    t: Tensor, *, std: float, t_open: float, t_close: float, generator: torch.Generator | None
) -> Tensor:
    """Gaussian spike-time noise (std in time units), kept inside the emitting neuron's window."""
    if std <= 0:
        return t
    noise = torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) * std
    return torch.where(torch.isfinite(t), (t + noise).clamp(t_open, t_close), t)
