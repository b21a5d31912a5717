"""The Nord spiking language model: token time is neuron time, sparsity counted over every spiking neuron.

    x_0    = E[idx]                                              (B, T, D) continuous residual stream
    block l:
      h    = RMSNorm(x)
      s    = DynamicDecay(W_u h)                                 mixer spikes; H_t = a_t H_{t-1} + (1-a_t) X_t
      g    = Θ(K h − θ_mem)                                      memory gate: one binary neuron per slot
      x   += W_o (s ⊙ σ(W_g h)) + g V                            token mixer + persistent memory read
      z    = Θ(W_1 RMSNorm(x) − θ_mlp)                           spiking MLP hidden layer, per token
      x   += W_2 z
    logits = RMSNorm(x) Eᵀ                                       (tied head; an untied W_head if configured)

The only state carried across tokens is the mixer neuron's (its membrane and its last conv inputs), so
`step` generates one token in O(1) time and memory and equals `forward` on the same sequence. The MLP
neurons fire per token with no memory: the mixer is the one time axis, the MLP stays a bank of pointwise
feature detectors, and the state peers and generation carry stays small. The memory module holds M
learned slots (keys K, values V) shared by every sequence; a token adds the values of the slots whose
gate neurons fire.

Firing rate = spikes / (spiking neurons × tokens) over the mixer, memory-gate and MLP neurons, per layer
and overall (an integer mixer spike counts as many spikes as it carries, so that rate may pass 1). The
regulariser is λ · mean_l (rate_l − target)². `spiking=False` builds the dense twin: the same network
with SiLU activations (the mixer's membrane, the gate and MLP pre-activations) in place of spikes, for
quality comparisons; its "rate" is the share of non-zero activations. `mlp="ttfs"` makes the MLP a ReLU,
ReLU(W_1 RMSNorm(x) − θ), trained as the twin of a time-to-first-spike network and run as one (at most
one spike per neuron per token) by `nord.ttfs`; its rate counts the hidden neurons that fire.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nord.checkpoint import load_checkpoint, save_checkpoint
from nord.errors import CheckpointError, ConfigError
from nord.neurons import DynamicDecayNeuron, spike
from nord.ttfs import TTFSMLP

SPIKE_MODES = ("binary", "integer")
MLP_KINDS = ("spiking", "ttfs")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and neuron settings of a `NordLM`; a section of `RunConfig`, saved in every checkpoint."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    d_mlp: int = 1024  # spiking MLP hidden neurons per layer
    n_memory_slots: int = 64  # M persistent memory slots per layer (0 = no memory module)
    conv_kernel: int = 4  # causal conv width of the mixer neuron's input-dependent decay
    chunk_size: int = 64  # chunk of the parallel scan (speed only; results do not depend on it)
    spike_mode: str = "binary"  # mixer spikes: "binary" {0,1} or "integer" {0..max_spikes}
    max_spikes: int = 4
    surrogate: str = "atan"
    mixer_threshold: float = 0.1  # initial per-channel thresholds (learned)
    mlp_threshold: float = 0.5
    memory_threshold: float = 0.5
    target_rate: float = 0.07
    rate_weight: float = 5.0  # λ of the per-layer (rate_l − target)² penalty; 0 disables it
    spiking: bool = True  # False: the dense twin (SiLU in place of spikes)
    mlp: str = "spiking"  # "ttfs": a ReLU MLP run as a time-to-first-spike network (nord.ttfs)
    tie_embeddings: bool = True
    max_seq_len: int = 256  # training window length; no positional table depends on it

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "d_mlp", "conv_kernel", "chunk_size", "max_spikes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_memory_slots, int) or self.n_memory_slots < 0:
            raise ConfigError(f"model.n_memory_slots must be an integer >= 0, got {self.n_memory_slots!r}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ConfigError(f"model.max_seq_len must be a positive integer, got {self.max_seq_len!r}")
        if self.mlp not in MLP_KINDS:
            raise ConfigError(f"model.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        if self.spike_mode not in SPIKE_MODES:
            raise ConfigError(f"model.spike_mode must be one of {SPIKE_MODES}, got {self.spike_mode!r}")
        if not 0.0 < self.target_rate < 1.0:
            raise ConfigError(f"model.target_rate must be in (0, 1), got {self.target_rate}")
        if not self.rate_weight >= 0.0:
            raise ConfigError(f"model.rate_weight must be >= 0, got {self.rate_weight}")
        for name in ("mixer_threshold", "mlp_threshold", "memory_threshold"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"model.{name} must be finite, got {getattr(self, name)}")

    @property
    def neurons_per_layer(self) -> int:
        """Spiking neurons per layer per token: mixer (D) + memory gate (M) + MLP hidden (F)."""
        return self.d_model + self.n_memory_slots + self.d_mlp


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean cross-entropy in nats, None without targets
    reg_loss: torch.Tensor  # firing-rate regulariser (0 for the dense twin)
    state: list[Any]  # per-layer mixer neuron state, to continue the sequence
    rates: dict[str, torch.Tensor]  # "layers.{l}" and "overall" -> firing rate (detached)
    memory_share: torch.Tensor  # share of the blocks' residual writes (L1) that the memory module made


class BlockOutput(NamedTuple):
    x: torch.Tensor  # the residual stream after the block
    state: Any  # the mixer neuron's state after the last token
    activity: torch.Tensor  # spikes fired by the block's neurons (a scalar)
    memory_write: torch.Tensor  # L1 of what the memory module added to the stream
    write: torch.Tensor  # L1 of everything the block added
    activations: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mixer, memory gate, MLP spikes


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Spiking token mixer + persistent memory read, then a spiking MLP; both residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, m, f = cfg.d_model, cfg.n_memory_slots, cfg.d_mlp
        self.norm1 = RMSNorm(d)
        self.mix_in = nn.Linear(d, d, bias=False)
        self.mix_gate = nn.Linear(d, d, bias=False)
        self.neuron = DynamicDecayNeuron(
            d,
            conv_kernel=cfg.conv_kernel,
            threshold_init=cfg.mixer_threshold,
            spike_mode=cfg.spike_mode,
            max_spikes=cfg.max_spikes,
            surrogate=cfg.surrogate,
            chunk_size=cfg.chunk_size,
        )
        self.mix_out = nn.Linear(d, d, bias=False)
        if m:
            self.memory_keys = nn.Parameter(torch.empty(m, d))
            self.memory_threshold = nn.Parameter(torch.full((m,), cfg.memory_threshold))
            self.memory_values = nn.Parameter(torch.empty(m, d))
        self.norm2 = RMSNorm(d)
        self.mlp_in = nn.Linear(d, f, bias=False)
        self.mlp_threshold = nn.Parameter(torch.full((f,), cfg.mlp_threshold))
        self.mlp_out = nn.Linear(f, d, bias=False)
        self.ttfs = TTFSMLP(surrogate=cfg.surrogate) if cfg.mlp == "ttfs" else None  # holds no weights

    def _fire(self, v: torch.Tensor) -> torch.Tensor:
        """Binary per-token spikes Θ(v) (surrogate gradient), or SiLU(v) in the dense twin."""
        return spike(v, surrogate=self.cfg.surrogate) if self.cfg.spiking else F.silu(v)

    def mix(self, h: torch.Tensor, state: Any, one_step: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Token mixer: (write W_o (s ⊙ σ(W_g h)), the mixer's activations s, the neuron's next state)."""
        neuron = self.neuron.step if one_step else self.neuron
        spikes, membrane, state = neuron(self.mix_in(h), state)  # (..., D) each
        mixed = spikes if self.cfg.spiking else F.silu(membrane)
        return self.mix_out(mixed * torch.sigmoid(self.mix_gate(h))), mixed, state

    def read_memory(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Persistent memory: (write g V, gate spikes g (..., M)); zeros without memory slots."""
        if not self.cfg.n_memory_slots:
            return torch.zeros_like(h), h.new_zeros(*h.shape[:-1], 0)
        gate = self._fire(h @ self.memory_keys.t() - self.memory_threshold)  # (..., M)
        return gate @ self.memory_values, gate

    def mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(write W_2 z, hidden activations z (..., F)) from the residual stream x."""
        if self.ttfs is not None:  # hidden: which TTFS neurons fire
            return self.ttfs(self.norm2(x), self.mlp_in.weight, self.mlp_threshold, self.mlp_out.weight)
        hidden = self._fire(self.mlp_in(self.norm2(x)) - self.mlp_threshold)  # (..., F)
        return self.mlp_out(hidden), hidden

    def forward(self, x: torch.Tensor, state: Any, *, one_step: bool = False) -> BlockOutput:
        """x (B, T, D) through the parallel scan, or one token x (B, D) with `one_step`."""
        h = self.norm1(x)  # (..., D)
        mix, mixed, state = self.mix(h, state, one_step)
        memory, gate = self.read_memory(h)
        x = x + mix + memory
        mlp, hidden = self.mlp(x)
        f32 = torch.float32  # sums in fp32: under fp16 autocast they would overflow past 65504
        with torch.no_grad():
            memory_write = memory.abs().sum(dtype=f32)
            write = mix.abs().sum(dtype=f32) + memory_write + mlp.abs().sum(dtype=f32)
        if self.cfg.spiking:  # spike count, differentiable through the surrogate (the regulariser needs it)
            activity = mixed.sum(dtype=f32) + gate.sum(dtype=f32) + hidden.sum(dtype=f32)
        else:  # the dense twin's "rate": its share of non-zero activations
            activity = sum((a != 0).sum().to(f32) for a in (mixed, gate, hidden))
        return BlockOutput(x + mlp, state, activity, memory_write, write, (mixed, gate, hidden))


class NordLM(nn.Module):
    """Spiking language model. Example:

    >>> model = NordLM(get_config("tiny"))
    >>> out = model(idx, targets)                     # idx, targets: (B, T) int64
    >>> (out.loss + out.reg_loss).backward()
    >>> logits, state, rates = model.step(idx[:, 0], model.init_state(B, idx.device))
    """

    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        # Keep only each block's input in training and recompute the block in backward (memory for time;
        # a run-time choice, not part of the config: the weights are the same).
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Inputs to neurons ~ N(0, 1) at init (so thresholds mean the same at any width); residual
        writes scaled down by depth (GPT-2)."""
        cfg = self.cfg
        nn.init.normal_(self.embed.weight, std=0.02)
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.blocks:
            for lin in (block.mix_in, block.mix_gate, block.mlp_in):
                nn.init.normal_(lin.weight, std=cfg.d_model**-0.5)
            for lin in (block.mix_out, block.mlp_out):
                nn.init.normal_(lin.weight, std=out_std)
            if cfg.n_memory_slots:
                nn.init.normal_(block.memory_keys, std=cfg.d_model**-0.5)
                nn.init.normal_(block.memory_values, std=out_std)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> list[Any]:
        dtype = self.embed.weight.dtype
        return [b.neuron.init_state(batch_size, torch.device(device), dtype) for b in self.blocks]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        weight = self.head.weight if self.head is not None else self.embed.weight
        if (
            torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
        ):
            # bf16 keeps 8 bits of mantissa: logits rounded to it cost validation loss (#22), so the
            # head runs in fp32 under bf16 autocast (fp16, 11 bits, as on CUDA, keeps it in fp16)
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), weight.float())
        return F.linear(x, weight)

    def _rates(
        self, activity: list[torch.Tensor], tokens: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        per_layer = [a / (tokens * self.cfg.neurons_per_layer) for a in activity]
        rates = {f"layers.{i}": r.detach() for i, r in enumerate(per_layer)}
        rates["overall"] = torch.stack(per_layer).mean().detach()
        if self.cfg.spiking and self.cfg.rate_weight > 0:
            reg = (
                self.cfg.rate_weight
                * torch.stack([(r - self.cfg.target_rate) ** 2 for r in per_layer]).mean()
            )
        else:
            reg = torch.zeros((), device=per_layer[0].device)
        return rates, reg

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, state: list[Any] | None = None
    ) -> LMOutput:
        B, T = idx.shape
        state = state if state is not None else [None] * len(self.blocks)
        x = self.embed(idx)  # (B, T, D)
        new_state, activity, memory_write, write = [], [], 0.0, 0.0
        for block, st in zip(self.blocks, state, strict=True):
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                b = torch.utils.checkpoint.checkpoint(block, x, st, use_reentrant=False)
            else:
                b = block(x, st)
            x = b.x
            new_state.append(b.state)
            activity.append(b.activity)
            memory_write, write = memory_write + b.memory_write, write + b.write
        logits = self._logits(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))
        rates, reg = self._rates(activity, B * T)
        share = memory_write / write.clamp_min(1e-12)
        return LMOutput(
            logits=logits, loss=loss, reg_loss=reg, state=new_state, rates=rates, memory_share=share
        )

    @torch.no_grad()
    def step(
        self, idx: torch.Tensor, state: list[Any], *, spikes_out: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[Any], dict[str, torch.Tensor]]:
        """One token per sequence: idx (B,) -> logits (B, V), the next state, firing rates.

        `spikes_out`, if given, is filled with "layers.{l}" -> (B, D + M + F) activations (mixer, memory
        gate, MLP), e.g. for a spike raster.
        """
        x = self.embed(idx)  # (B, D)
        new_state, activity = [], []
        for i, (block, st) in enumerate(zip(self.blocks, state, strict=True)):
            b = block(x, st, one_step=True)
            x = b.x
            new_state.append(b.state)
            activity.append(b.activity)
            if spikes_out is not None:
                spikes_out[f"layers.{i}"] = torch.cat(b.activations, dim=-1)
        rates, _ = self._rates(activity, idx.shape[0])
        return self._logits(x), new_state, rates

    def param_spec(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of the trainable tensors peers exchange (state_dict order, tied weights once)."""
        return {name: tuple(p.shape) for name, p in self.named_parameters()}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def resolve_device(name: str | torch.device) -> torch.device:
    """A torch device from a CLI string ("auto": CUDA when there is one); ConfigError (not a traceback)
    if it is unknown or absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def save_model(path: str | os.PathLike, model: NordLM, metadata: dict[str, object] | None = None) -> str:
    """Save the weights atomically with the model config (JSON) in the metadata; return the weights hash."""
    meta = {"model_config": dataclasses.asdict(model.cfg), **(metadata or {})}
    return save_checkpoint(path, model.state_dict(), meta)


def load_model(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", expect: ModelConfig | None = None
) -> tuple[NordLM, dict[str, str]]:
    """Build the model a checkpoint describes and load its weights; return (model, metadata).

    Raises CheckpointError if the file is missing, corrupt or truncated, has no usable model config,
    differs from `expect`, or holds tensors of another shape than its config.
    """
    tensors, meta = load_checkpoint(path)
    try:
        cfg = ModelConfig(**json.loads(meta["model_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: no valid model config in the checkpoint metadata ({e})") from None
    if expect is not None and cfg != expect:
        raise CheckpointError(
            f"{path} holds a model of another config ({cfg}) than the one asked for ({expect})"
        )
    model = NordLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its model config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"{path} does not match its model config: {name} has shape {tuple(t.shape)}, "
                f"the config needs {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(device), meta
