"""A block's MLP trained as its ReLU twin and run as a time-to-first-spike network (`ModelConfig.mlp="ttfs"`).

    y = W_2 ReLU(W_1 h − θ)                                          the ReLU twin (training)

runs as three layers of neurons (membrane equations in `nord.ttfs.simulate`), times in value units:
    encoder   window [0, T_0]: h_j > 0 → channel (j,+) spikes at T_0 − h_j, h_j < 0 → (j,−) at T_0 + h_j,
              synapses +W_1 and −W_1; one bias spike at 0 (value T_0) with slope −θ_i / T_0
    hidden    F TTFS neurons, window [T_0, T_0 + T_1], ϑ = T_1:  T_0 + T_1 − t_i = min(ReLU(W_1 h − θ)_i, T_1)
    read-out  D non-spiking neurons read at T_0 + T_1:  y_o = Σ_i W2_oi (T_0 + T_1 − t_i)

Windows (T_0 ≥ max|h|, T_1 ≥ max z) are calibrated on data (`calibrate`); uncalibrated, each call sizes
them to its own inputs. A larger value saturates (fires as the window opens) and is counted.

Hardware constraints (Stanojevic et al. 2024), `TTFSConstraints`:
    time_bits b   spike times on a clock of 2^b ticks per window (first tick at or after the crossing)
    weight_bits   W_1, W_2 quantised per neuron, symmetric, 2^(bits−1) − 1 levels each side
    jitter σ      Gaussian spike-time noise of σ·T, kept inside the window
The twin applies the same constraints in the value domain with straight-through gradients, so a
fine-tuning with them in the loop recovers what they cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nord.errors import ConfigError
from nord.neurons import spike
from nord.ttfs.simulate import (
    INF,
    fire_closed,
    fire_events,
    jitter_times,
    quantize_times,
    read_out_closed,
    read_out_events,
)

ENGINES = ("relu", "events", "closed")  # the twin; the event-driven simulation; its closed form


@dataclass(frozen=True, kw_only=True)
class TTFSConstraints:
    """Hardware constraints on a deployed TTFS network; the defaults are none (exact)."""

    time_bits: int | None = None  # spike times on 2^b ticks per window
    weight_bits: int | None = None  # 4 in the paper
    jitter: float = 0.0  # spike-time noise std, as a fraction of the window

    def __post_init__(self) -> None:
        for name in ("time_bits", "weight_bits"):
            bits = getattr(self, name)
            if bits is not None and (
                not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 24
            ):
                raise ConfigError(f"ttfs {name} must be an integer in 2..24 or None, got {bits!r}")
        if not (math.isfinite(self.jitter) and 0.0 <= self.jitter < 1.0):
            raise ConfigError(f"ttfs jitter must be in [0, 1), got {self.jitter}")

    @property
    def active(self) -> bool:
        return self.time_bits is not None or self.weight_bits is not None or self.jitter > 0


class Windows(NamedTuple):
    input: float  # T_0: the encoder's window, ≥ max |h|
    hidden: float  # T_1: the hidden layer's window and threshold, ≥ max pre-activation


@dataclass
class TTFSStats:
    """Counts over simulated tokens, summed over layers (`tokens` counts each model token once)."""

    tokens: int = 0
    hidden_spikes: int = 0
    hidden_neuron_tokens: int = 0  # hidden neurons × tokens
    input_spikes: int = 0  # encoder spikes, the bias spike included
    input_neuron_tokens: int = 0
    saturated: int = 0  # values clipped by a window (0: the network is exactly its twin)
    synaptic_events: int = 0  # spikes × fan-out
    dense_macs: int = 0  # multiply-accumulates of the dense MLP on the same tokens

    def __add__(self, other: TTFSStats) -> TTFSStats:
        return TTFSStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def spikes_per_neuron(self) -> float:
        """Hidden TTFS spikes per neuron per token (each neuron fires at most once)."""
        return self.hidden_spikes / max(1, self.hidden_neuron_tokens)

    @property
    def spikes_per_neuron_all(self) -> float:
        """The same over encoder and hidden neurons together."""
        total = self.hidden_neuron_tokens + self.input_neuron_tokens
        return (self.hidden_spikes + self.input_spikes) / max(1, total)

    @property
    def events_per_mac(self) -> float:
        return self.synaptic_events / max(1, self.dense_macs)

    def summary(self) -> str:
        per_token = max(1, self.tokens)
        return (
            f"TTFS: {self.spikes_per_neuron:.3f} spikes per hidden neuron per token "
            f"({self.spikes_per_neuron_all:.3f} with the encoders), "
            f"{self.synaptic_events / per_token:,.0f} synaptic events per token vs "
            f"{self.dense_macs / per_token:,.0f} dense MACs ({self.events_per_mac:.3f}), "
            f"{self.saturated} saturated"
        )


class TTFSResult(NamedTuple):
    y: Tensor  # (N, D) read-out membranes = the MLP's output
    hidden_times: Tensor  # (N, F) spike times, inf for silent neurons
    input_times: Tensor  # (N, 2D + 1) encoder spike times (+ channels, − channels, bias)
    saturated: int
    windows: Windows


def quantize_weights(w: Tensor, bits: int | None) -> Tensor:
    """Symmetric per-row (per receiving neuron) quantisation, straight-through gradient."""
    if bits is None:
        return w
    levels = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
    q = (w / scale).round().clamp(-levels, levels) * scale
    return w + (q - w).detach()


def _code(v: Tensor, window: float, c: TTFSConstraints, generator: torch.Generator | None) -> Tensor:
    """A value v ≥ 0 as its spike would carry it: clipped to the window, on the clock, jittered."""
    v = v.clamp(max=window)
    if c.time_bits is not None:
        step = window / 2**c.time_bits
        wait = step * torch.ceil((window - v.detach()) / step)  # time from the window's start to the tick
        q = torch.where(wait < window - step / 2, window - wait, torch.zeros_like(v))
        v = v + (q - v).detach()
    if c.jitter > 0:
        noise = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device) * (c.jitter * window)
        v = torch.where(v > 0, (v - noise).clamp(0, window), v)
    return v


def relu_twin(
    h: Tensor,
    w_in: Tensor,
    threshold: Tensor,
    w_out: Tensor,
    *,
    windows: Windows | None = None,
    constraints: TTFSConstraints | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The ReLU MLP (differentiable): h (N, D) -> (y (N, D), pre-activations z (N, F)).

    With active `constraints` (which need `windows`) it is the constrained TTFS network in the value
    domain: clipped, clocked and jittered values, quantised weights, straight-through gradients.
    """
    c = constraints or TTFSConstraints()
    if c.active and windows is None:
        raise ConfigError("TTFS constraints need calibrated windows: run nord.ttfs.calibrate first")
    w1, w2 = quantize_weights(w_in, c.weight_bits), quantize_weights(w_out, c.weight_bits)
    if c.active:
        h = h.sign() * _code(h.abs(), windows.input, c, generator)
    z = F.linear(h, w1) - threshold  # (N, F)
    x = F.relu(z)
    if c.active:
        x = _code(x, windows.hidden, c, generator)
    return F.linear(x, w2), z


@torch.no_grad()
def ttfs_mlp(
    h: Tensor,
    w_in: Tensor,
    threshold: Tensor,
    w_out: Tensor,
    *,
    windows: Windows | None = None,
    constraints: TTFSConstraints | None = None,
    engine: str = "events",
    generator: torch.Generator | None = None,
) -> TTFSResult:
    """The MLP as a TTFS network, simulated in float64: h (N, D) -> `TTFSResult`.

    Example: `ttfs_mlp(h, block.mlp_in.weight, block.mlp_threshold, block.mlp_out.weight).y` equals
    `relu_twin(...)[0]` to float precision.
    """
    if engine not in ("events", "closed"):
        raise ConfigError(f"TTFS simulation engine must be 'events' or 'closed', got {engine!r}")
    c = constraints or TTFSConstraints()
    h, threshold = h.double(), threshold.double()
    w1 = quantize_weights(w_in.double(), c.weight_bits)
    w2 = quantize_weights(w_out.double(), c.weight_bits)
    if windows is None:  # sized to this call, a hair past its largest values: nothing saturates
        z = h @ w1.t() - threshold
        windows = Windows(*(max(1e-6, 1.001 * v) for v in (h.abs().max().item(), z.max().item())))
    t0, t1 = windows
    t_end = t0 + t1
    clock = (lambda window: window / 2**c.time_bits) if c.time_bits is not None else (lambda window: None)

    magnitude = h.abs()
    saturated = int((magnitude > t0).sum())
    t = quantize_times(t0 - magnitude.clamp(max=t0), t_open=0.0, step=clock(t0), t_close=t0)
    t = torch.where(magnitude > 0, t, INF)
    t = jitter_times(t, std=c.jitter * t0, t_open=0.0, t_close=t0, generator=generator)
    bias_spike = h.new_zeros(h.shape[0], 1)
    input_times = torch.cat([torch.where(h > 0, t, INF), torch.where(h < 0, t, INF), bias_spike], dim=1)
    synapses = torch.cat([w1.t(), -w1.t(), (-threshold / t0)[None]], dim=0)  # (2D + 1, F)

    fire, read_out = (fire_events, read_out_events) if engine == "events" else (fire_closed, read_out_closed)
    hidden, v_open = fire(input_times, synapses, t_open=t0, t_close=t_end, threshold=t1)
    saturated += int((v_open > t1).sum())
    hidden = quantize_times(hidden, t_open=t0, step=clock(t1), t_close=t_end)
    hidden = jitter_times(hidden, std=c.jitter * t1, t_open=t0, t_close=t_end, generator=generator)
    y = read_out(hidden, w2.t(), t_close=t_end)
    return TTFSResult(y, hidden, input_times, saturated, windows)


class TTFSMLP(nn.Module):
    """Run-time side of a block's TTFS MLP; the weights stay the block's (mlp_in, mlp_threshold, mlp_out),
    so a TTFS model's parameters, checkpoints and deltas are those of any other Nord model.

    `engine`: "relu" (the twin; training), "events" (event-driven simulation), "closed" (its closed form).
    """

    def __init__(self, *, surrogate: str = "atan"):
        super().__init__()
        self.surrogate = surrogate
        self.engine = "relu"
        self.constraints = TTFSConstraints()
        self.windows: Windows | None = None
        self.generator: torch.Generator | None = None
        self.stats = TTFSStats()
        self.observed: Windows | None = None  # running max |h| and max z while calibrating
        self.calibrating = False

    def forward(self, h: Tensor, w_in: Tensor, threshold: Tensor, w_out: Tensor) -> tuple[Tensor, Tensor]:
        """h (..., D) -> (MLP output (..., D), hidden spikes (..., F) as 0/1 with a surrogate gradient)."""
        flat = h.reshape(-1, h.shape[-1])  # (N, D)
        if self.engine == "relu":
            y, z = relu_twin(
                flat, w_in, threshold, w_out,
                windows=self.windows, constraints=self.constraints, generator=self.generator,
            )  # fmt: skip
            if self.calibrating:
                self._observe(flat, z)
            fired = spike(z, surrogate=self.surrogate)
        else:
            result = ttfs_mlp(
                flat, w_in, threshold, w_out, windows=self.windows, constraints=self.constraints,
                engine=self.engine, generator=self.generator,
            )  # fmt: skip
            fired = torch.isfinite(result.hidden_times)
            self._count(result, fired, w_in.shape)
            y = result.y
        return y.to(h.dtype).reshape(h.shape), fired.to(h.dtype).reshape(*h.shape[:-1], -1)

    @torch.no_grad()
    def _observe(self, h: Tensor, z: Tensor) -> None:
        seen = Windows(h.abs().max().item(), z.max().item())
        self.observed = seen if self.observed is None else Windows(*map(max, self.observed, seen))

    def _count(self, result: TTFSResult, fired: Tensor, shape: torch.Size) -> None:
        f, d = shape
        n = fired.shape[0]
        inputs = int(torch.isfinite(result.input_times).sum())
        hidden = int(fired.sum())
        self.stats = self.stats + TTFSStats(
            tokens=n,
            hidden_spikes=hidden,
            hidden_neuron_tokens=n * f,
            input_spikes=inputs,
            input_neuron_tokens=n * (2 * d + 1),
            saturated=result.saturated,
            synaptic_events=inputs * f + hidden * d,
            dense_macs=n * 2 * d * f,
        )


def ttfs_layers(model: nn.Module) -> list[TTFSMLP]:
    layers = [m for m in model.modules() if isinstance(m, TTFSMLP)]
    if not layers:
        raise ConfigError("the model has no TTFS MLPs; build it with ModelConfig(mlp='ttfs')")
    return layers


def configure(
    model: nn.Module,
    *,
    engine: str | None = None,
    constraints: TTFSConstraints | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Choose how every TTFS MLP of `model` runs (engine, constraints, jitter generator)."""
    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"TTFS engine must be one of {ENGINES}, got {engine!r}")
    for layer in ttfs_layers(model):
        layer.engine = engine or layer.engine
        layer.constraints = constraints if constraints is not None else layer.constraints
        layer.generator = generator


@torch.no_grad()
def calibrate(model: nn.Module, idx: Tensor, *, margin: float = 1.0) -> list[Windows]:
    """Size each layer's windows to `margin` × the largest |h| and pre-activation the twin sees on idx."""
    if not margin >= 1.0:
        raise ConfigError(f"calibration margin must be >= 1, got {margin}")
    layers = ttfs_layers(model)
    saved = [(layer.engine, layer.constraints) for layer in layers]
    for layer in layers:
        layer.engine, layer.constraints, layer.calibrating, layer.observed = (
            "relu",
            TTFSConstraints(),
            True,
            None,
        )
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for layer, (engine, constraints) in zip(layers, saved, strict=True):
            layer.engine, layer.constraints, layer.calibrating = engine, constraints, False
    for layer in layers:
        layer.windows = Windows(*(max(1e-6, margin * v) for v in layer.observed))
    return [layer.windows for layer in layers]


def collect_stats(model: nn.Module, *, reset: bool = True) -> TTFSStats:
    """Spike and event counts of every TTFS MLP since the last reset, summed over layers."""
    layers = ttfs_layers(model)
    total = sum((layer.stats for layer in layers), TTFSStats())
    total.tokens = max(layer.stats.tokens for layer in layers)  # every layer sees each token once
    if reset:
        for layer in layers:
            layer.stats = TTFSStats()
    return total
