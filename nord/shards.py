"""Parameter shards: a worker trains a subset of the model and contributes only that subset.

With S = `ShardConfig.count` shards over a model of L blocks:

    S = 1        shard 0 is the whole model
    S >= 2       shard 0 = embedding, final norm and (untied) head
                 shard 1 + g = blocks l with ⌊l·(S−1)/L⌋ = g             g = 0 .. S−2 (consecutive blocks)

A worker freezes every parameter outside its shards (requires_grad False: no gradient, no optimizer
state). Autograd builds no graph for blocks whose input and weights are all frozen, so nothing below the
lowest trained block is saved for backward (the embedding is the bottom of the stack: training shard 0
needs every block's activations). Its contribution names only its shards' tensors; the CRDT's sparse-aware
mean (a coordinate averaged over the contributors that touched it) then combines shards without any
further bookkeeping.

Assignment: a worker takes the least-covered shards of the open round (coverage = the shard sets in the
peers' presence records plus the shards named by the round's contributions), ties broken by a hash of
its peer id so that simultaneous joiners spread out; as many as fit its memory (`plan_shards`), at most
`per_worker`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from nord.errors import ConfigError
from nord.memory import MemoryEstimate, estimate_training_memory
from nord.model import ModelConfig

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_OUTER = ("embed.", "norm.", "head.")  # embedding, final norm, untied head


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """How the run splits the model's parameters; a section of `RunConfig`."""

    count: int = 1  # S shards (1: every worker trains the whole model)
    per_worker: int = 0  # shards one worker trains at most (0: as many as fit its memory)

    def __post_init__(self) -> None:
        for name, low in (("count", 1), ("per_worker", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"shards.{name} must be an integer >= {low}, got {value!r}")
        if self.per_worker > self.count:
            raise ConfigError(
                f"shards.per_worker ({self.per_worker}) is more than shards.count ({self.count})"
            )


def _check(model_cfg: ModelConfig, shard_cfg: ShardConfig) -> None:
    if shard_cfg.count > model_cfg.n_layers + 1:
        raise ConfigError(
            f"shards.count {shard_cfg.count} is more than the model's {model_cfg.n_layers} blocks + 1 "
            "(embedding/head) shard"
        )


def shard_of(param_name: str, model_cfg: ModelConfig, shard_cfg: ShardConfig) -> int:
    """The shard holding parameter `param_name` (a `NordLM.param_spec()` name)."""
    _check(model_cfg, shard_cfg)
    if shard_cfg.count == 1:
        return 0
    match = _BLOCK.match(param_name)
    if match:
        layer = int(match.group(1))
        if layer >= model_cfg.n_layers:
            raise ConfigError(f"parameter {param_name!r}: the model has {model_cfg.n_layers} blocks")
        return 1 + layer * (shard_cfg.count - 1) // model_cfg.n_layers
    if param_name.startswith(_OUTER):
        return 0
    raise ConfigError(f"parameter {param_name!r} belongs to no shard (not a NordLM parameter name)")


def shard_params(spec: Iterable[str], model_cfg: ModelConfig, shard_cfg: ShardConfig) -> list[list[str]]:
    """Names of each shard's parameters, in `spec` order: result[s] is shard s."""
    shards: list[list[str]] = [[] for _ in range(shard_cfg.count)]
    for name in spec:
        shards[shard_of(name, model_cfg, shard_cfg)].append(name)
    return shards


def shards_of_names(names: Iterable[str], model_cfg: ModelConfig, shard_cfg: ShardConfig) -> set[int]:
    """The shards that a contribution naming `names` covers."""
    return {shard_of(name, model_cfg, shard_cfg) for name in names}


def trained_names(
    spec: Iterable[str], model_cfg: ModelConfig, shard_cfg: ShardConfig, shards: Iterable[int]
) -> list[str]:
    """The parameters a worker on `shards` trains and contributes (spec order)."""
    chosen = set(shards)
    return [name for name in spec if shard_of(name, model_cfg, shard_cfg) in chosen]


def backward_extent(
    model_cfg: ModelConfig, shard_cfg: ShardConfig, shards: Iterable[int]
) -> tuple[int, int, bool]:
    """(first block backward passes through, frozen blocks above it, whether the head trains).

    Backward starts at the embedding (block 0) if shard 0 trains, else at the lowest trained block;
    blocks below it run without a graph."""
    chosen = set(shards)
    if not chosen or not chosen <= set(range(shard_cfg.count)):
        raise ConfigError(f"shards {sorted(chosen)} are not a subset of 0..{shard_cfg.count - 1}")
    if shard_cfg.count == 1:
        return 0, 0, True
    trained = [
        1 + layer * (shard_cfg.count - 1) // model_cfg.n_layers in chosen
        for layer in range(model_cfg.n_layers)
    ]
    first = 0 if 0 in chosen else trained.index(True)
    return first, trained[first:].count(False), 0 in chosen


def parse_shards(text: str, shard_cfg: ShardConfig) -> tuple[int, ...]:
    """`--shards 0,2` -> (0, 2); ConfigError naming the problem otherwise."""
    try:
        shards = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ConfigError(f"--shards {text!r}: write shard ids separated by commas, e.g. 0,2") from None
    if not shards:
        raise ConfigError(f"--shards {text!r}: name at least one shard")
    bad = [s for s in shards if not 0 <= s < shard_cfg.count]
    if bad:
        raise ConfigError(
            f"--shards {text!r}: shard {bad[0]} does not exist (this run has {shard_cfg.count})"
        )
    return shards


def freeze_outside(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Train only the parameters in `names`: every other one gets requires_grad False."""
    keep = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


def contribution_delta(
    model: torch.nn.Module, base: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """new − base for the trained tensors only (CPU float32): what goes to `DeltaEncoder.encode`."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().to("cpu", torch.float32) - base[name] for name in names}


# ---- assignment -----------------------------------------------------------------------------------------


def coverage(shard_sets: Iterable[Iterable[int]], count: int) -> list[int]:
    """How many of `shard_sets` cover each shard (ids out of range are ignored: a peer's record)."""
    counts = [0] * count
    for shards in shard_sets:
        for s in set(shards):
            if isinstance(s, int) and 0 <= s < count:
                counts[s] += 1
    return counts


def round_coverage(
    model_cfg: ModelConfig,
    shard_cfg: ShardConfig,
    *,
    presence: Mapping[str, object],
    contributions: Iterable[tuple[str, Iterable[str]]],
    me: str,
) -> list[int]:
    """Coverage of the open round from what gossip shows: the `shards` of the live peers' presence
    records (peer id -> record; `me` left out) and the shards of the round's contributions
    ((signing key hex, tensor names) pairs) whose author has no presence record with a `key`."""
    sets, keys = [], set()
    for peer, record in presence.items():
        if peer == me or not isinstance(record, dict):
            continue
        shards = record.get("shards")
        if isinstance(shards, (list, tuple)):
            sets.append(shards)
            keys.add(record.get("key"))
    for key, names in contributions:
        if key not in keys:
            sets.append(shards_of_names(names, model_cfg, shard_cfg))
    return coverage(sets, shard_cfg.count)


def least_covered(counts: Sequence[int], n: int, *, tie_break: str) -> tuple[int, ...]:
    """The `n` least-covered shards; equal coverage is ordered by sha256(tie_break, shard)."""

    def key(s: int) -> tuple[int, bytes]:
        return counts[s], hashlib.sha256(f"{tie_break}:{s}".encode()).digest()

    return tuple(sorted(sorted(range(len(counts)), key=key)[:n]))


def shard_sizes(model_cfg: ModelConfig, shard_cfg: ShardConfig) -> list[int]:
    """Parameter count of each shard (exact; built on the meta device)."""
    from nord.model import NordLM

    with torch.device("meta"):
        params = dict(NordLM(model_cfg).named_parameters())
    sizes = [0] * shard_cfg.count
    for name, p in params.items():
        sizes[shard_of(name, model_cfg, shard_cfg)] += p.numel()
    return sizes


def estimate_shard_memory(
    model_cfg: ModelConfig,
    shard_cfg: ShardConfig,
    shards: Iterable[int],
    *,
    sizes: Sequence[int] | None = None,
    **kwargs,
) -> MemoryEstimate:
    """`estimate_training_memory` for a worker training `shards`: gradients and optimizer states for
    their parameters only, activations from the first trained block up (kwargs: batch_size, seq_len,
    fp16, optimizer, activation_checkpointing)."""
    chosen = set(shards)
    sizes = shard_sizes(model_cfg, shard_cfg) if sizes is None else sizes
    first, frozen, head_trained = backward_extent(model_cfg, shard_cfg, chosen)
    return estimate_training_memory(
        model_cfg,
        n_params=sum(sizes),
        trainable_params=sum(sizes[s] for s in chosen),
        first_trained_block=first,
        frozen_blocks=frozen,
        head_trained=head_trained,
        **kwargs,
    )


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    shards: tuple[int, ...]
    activation_checkpointing: bool
    estimate: MemoryEstimate
    fits: bool  # False: even one shard with checkpointing is over the budget (tried anyway)

    def describe(self, budget_bytes: int) -> str:
        gib = 1024**3
        return (
            f"training parameter shard(s) {','.join(map(str, self.shards))} "
            f"({'with' if self.activation_checkpointing else 'without'} activation checkpointing): "
            f"estimated {self.estimate.total / gib:.2f} GiB of {budget_bytes / gib:.2f} GiB"
            + ("" if self.fits else " — over budget, trying anyway")
        )


def plan_for(
    model_cfg: ModelConfig,
    shard_cfg: ShardConfig,
    shards: Iterable[int],
    *,
    budget_bytes: int,
    sizes: Sequence[int] | None = None,
    **sizing,
) -> ShardPlan:
    """Training `shards`: without activation checkpointing if that fits `budget_bytes`, else with it
    (sizing: batch_size, seq_len, fp16, optimizer)."""
    shards = tuple(sorted(set(shards)))
    sizes = shard_sizes(model_cfg, shard_cfg) if sizes is None else sizes
    for checkpointing in (False, True):
        est = estimate_shard_memory(
            model_cfg, shard_cfg, shards, sizes=sizes, activation_checkpointing=checkpointing, **sizing
        )
        if est.total <= budget_bytes:
            return ShardPlan(shards=shards, activation_checkpointing=checkpointing, estimate=est, fits=True)
    return ShardPlan(shards=shards, activation_checkpointing=True, estimate=est, fits=False)


def plan_shards(
    model_cfg: ModelConfig,
    shard_cfg: ShardConfig,
    counts: Sequence[int],
    *,
    budget_bytes: int,
    tie_break: str,
    **sizing,
) -> ShardPlan:
    """The largest set of least-covered shards (`counts`: coverage per shard) that fits `budget_bytes`.

    At most `shard_cfg.per_worker` shards (all if 0); one shard with checkpointing if nothing fits.
    """
    sizes = shard_sizes(model_cfg, shard_cfg)
    for n in range(shard_cfg.per_worker or shard_cfg.count, 0, -1):
        shards = least_covered(counts, n, tie_break=tie_break)
        plan = plan_for(model_cfg, shard_cfg, shards, budget_bytes=budget_bytes, sizes=sizes, **sizing)
        if plan.fits:
            return plan
    return plan


def worker_sizing(batch_size: int, seq_len: int, device: torch.device | str) -> dict[str, object]:
    """How a worker trains on `device` (for the estimator): fp16 autocast and 8-bit AdamW on CUDA."""
    cuda = torch.device(device).type == "cuda"
    return {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "fp16": cuda,
        "optimizer": "adamw8bit" if cuda else "adamw",
    }
