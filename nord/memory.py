"""Training-memory estimator: does a config train on a 16 GB T4?

    total = params + grads + optimizer + activations + CUDA context
    params       4 B/param (fp32 master weights) + 2 B/param under fp16 autocast (cached fp16 copies)
    grads        4 B/trainable param
    optimizer    AdamW 8 B/trainable param (two fp32 moments); bitsandbytes 8-bit AdamW 2 B (+ block scales)
    activations  tokens · [L' · (c_D·D + c_F·F + c_M·M) + c_V·V]                 (bytes per token)
                 with activation checkpointing: tokens · [L'·4·D + (c_D·D + c_F·F + c_M·M) + c_V·V]
                 (the fp32 residual stream at each block input kept, one block recomputed at a time)
                 L' = L − first trained block: a worker training only some blocks (nord.shards) runs the
                 frozen ones below without a graph, so they save nothing; a frozen block above the first
                 trained one saves (c'_D·D + c'_F·F + c'_M·M) (backward only passes through it), and a
                 frozen head h_D·D less

The per-token coefficients count the tensors autograd saves in one block (`NordLM` plus the neuron's
scan); tests/nord/test_memory.py checks them against the bytes autograd really saves, and the whole
estimate against the peak RSS growth of a CPU training step in a fresh process.
"""

from __future__ import annotations

from dataclasses import dataclass

from nord.errors import ConfigError
from nord.model import ModelConfig

GIB = 1024**3
T4_USABLE_BYTES = 15 * GIB  # what a 16 GB T4 leaves to PyTorch (Colab reports ~15 GiB)
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # CUDA context, cuBLAS workspace, allocator slack
OPTIMIZERS = ("adamw", "adamw8bit")

# Bytes autograd saves per token in one block, per unit of D, F and M, for (fp32, fp16 autocast).
# Measured with `torch.autograd.graph.saved_tensors_hooks` (tests/nord/test_memory.py): per D the norms,
# the mixer projections and gate, and the neuron's float32 scan (inputs, decays, membranes, spikes); per F
# and M a spike's float32 input and its output. Autocast halves the matmul inputs; the neuron stays fp32.
BLOCK_BYTES = {False: (56, 8, 8), True: (50, 6, 6)}
# The same for a frozen block that backward passes through: no weight gradients, so matmuls keep only
# what the input gradient needs (measured the same way, three shapes, residual < 2 B).
FROZEN_BLOCK_BYTES = {False: (36, 4, 4), True: (32, 4, 4)}
# Per token and vocabulary entry: the saved fp32 log-softmax, the live logits and their gradient.
HEAD_BYTES = {False: 12, True: 12}
# Per token and unit of D: what a frozen final norm and head do not save.
FROZEN_HEAD_SAVING = {False: 12, True: 10}


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    params: int  # bytes
    grads: int
    optimizer: int
    activations: int
    overhead: int
    total: int
    fits_t4: bool

    def table(self) -> str:
        rows = [
            (k, getattr(self, k))
            for k in ("params", "grads", "optimizer", "activations", "overhead", "total")
        ]
        lines = [f"{k:<12} {v / GIB:8.2f} GiB" for k, v in rows]
        return "\n".join([*lines, f"fits a 16 GB T4: {'yes' if self.fits_t4 else 'no'}"])


def count_params(cfg: ModelConfig) -> int:
    """Exact trainable parameter count of `NordLM(cfg)` (built on the meta device: no memory used)."""
    import torch

    from nord.model import NordLM

    with torch.device("meta"):
        return NordLM(cfg).num_params()


def activation_bytes(
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_len: int,
    fp16: bool,
    activation_checkpointing: bool,
    first_trained_block: int = 0,
    frozen_blocks: int = 0,
    head_trained: bool = True,
) -> int:
    """Bytes autograd keeps for one forward pass of `batch_size` windows of `seq_len` tokens, when
    blocks from `first_trained_block` up need a graph, `frozen_blocks` of them frozen."""
    tokens = batch_size * seq_len

    def block_bytes(coefficients: tuple[int, int, int]) -> int:
        per_d, per_f, per_m = coefficients
        return per_d * cfg.d_model + per_f * cfg.d_mlp + per_m * cfg.n_memory_slots

    block, frozen = block_bytes(BLOCK_BYTES[fp16]), block_bytes(FROZEN_BLOCK_BYTES[fp16])
    head = HEAD_BYTES[fp16] * cfg.vocab_size - (0 if head_trained else FROZEN_HEAD_SAVING[fp16] * cfg.d_model)
    layers = cfg.n_layers - first_trained_block
    if activation_checkpointing:
        return tokens * (layers * 4 * cfg.d_model + (block if layers > frozen_blocks else frozen) + head)
    return tokens * ((layers - frozen_blocks) * block + frozen_blocks * frozen + head)


def estimate_training_memory(
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_len: int,
    fp16: bool = True,
    optimizer: str = "adamw8bit",
    activation_checkpointing: bool = False,
    trainable_fraction: float = 1.0,
    n_params: int | None = None,
    trainable_params: int | None = None,
    first_trained_block: int = 0,
    frozen_blocks: int = 0,
    head_trained: bool = True,
) -> MemoryEstimate:
    """Estimate the peak GPU memory of training `cfg` (see the module docstring for the terms).

    `trainable_params` (exact) or `trainable_fraction` say how many parameters have gradients and
    optimizer states; `first_trained_block` is the lowest block backward goes through, `frozen_blocks`
    the frozen ones above it, `head_trained` whether the final norm and head train
    (`nord.shards.estimate_shard_memory` fills these for a shard set).

    Example:
        >>> est = estimate_training_memory(get_config("nord-1b"), batch_size=2, seq_len=1024,
        ...                                activation_checkpointing=True)
        >>> est.fits_t4
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not 0.0 < trainable_fraction <= 1.0:
        raise ConfigError(f"trainable_fraction must be in (0, 1], got {trainable_fraction}")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if not 0 <= first_trained_block < cfg.n_layers:
        raise ConfigError(f"first_trained_block must be in [0, {cfg.n_layers}), got {first_trained_block}")
    if not 0 <= frozen_blocks <= cfg.n_layers - first_trained_block - (0 if head_trained else 1):
        raise ConfigError(f"frozen_blocks must leave something above block {first_trained_block} to train")
    n = count_params(cfg) if n_params is None else n_params
    if trainable_params is not None and not 0 < trainable_params <= n:
        raise ConfigError(f"trainable_params must be in (0, {n}], got {trainable_params}")
    trainable = int(n * trainable_fraction) if trainable_params is None else trainable_params
    params = n * (4 + (2 if fp16 else 0))
    grads = trainable * 4
    # 8-bit AdamW: two uint8 moments plus one fp32 absmax per 2048-value block and moment.
    opt = trainable * (8 if optimizer == "adamw" else 2) + (0 if optimizer == "adamw" else trainable // 256)
    acts = activation_bytes(
        cfg,
        batch_size=batch_size,
        seq_len=seq_len,
        fp16=fp16,
        activation_checkpointing=activation_checkpointing,
        first_trained_block=first_trained_block,
        frozen_blocks=frozen_blocks,
        head_trained=head_trained,
    )
    overhead = CUDA_CONTEXT_BYTES
    total = params + grads + opt + acts + overhead
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=opt,
        activations=acts,
        overhead=overhead,
        total=total,
        fits_t4=total <= T4_USABLE_BYTES,
    )


def device_memory_bytes(device) -> int:
    """Memory a training run may use on `device`: the GPU's total, or the host's available RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: the physical memory
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
