"""Training-memory estimator: does a config train on a 16 GB T4?

    total = params + grads + optimizer + activations + CUDA context
    params       4 B/param (fp32 master weights) + 2 B/param under fp16 autocast (cached fp16 copies)
    grads        4 B/trainable param
    optimizer    AdamW 8 B/trainable param (two fp32 moments); bitsandbytes 8-bit AdamW 2 B (+ block scales)
    activations  tokens · [L · (c_D·D + c_F·F + c_M·M) + c_V·V]                  (bytes per token)
                 with activation checkpointing: tokens · [L·4·D + (c_D·D + c_F·F + c_M·M) + c_V·V]
                 (the fp32 residual stream at each block input kept, one block recomputed at a time)

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
# Per token and vocabulary entry: the saved fp32 log-softmax, the live logits and their gradient.
HEAD_BYTES = {False: 12, True: 12}


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
    cfg: ModelConfig, *, batch_size: int, seq_len: int, fp16: bool, activation_checkpointing: bool
) -> int:
    """Bytes autograd keeps for one forward pass of `batch_size` windows of `seq_len` tokens."""
    per_d, per_f, per_m = BLOCK_BYTES[fp16]
    tokens = batch_size * seq_len
    block = per_d * cfg.d_model + per_f * cfg.d_mlp + per_m * cfg.n_memory_slots
    head = HEAD_BYTES[fp16] * cfg.vocab_size
    if activation_checkpointing:
        return tokens * (cfg.n_layers * 4 * cfg.d_model + block + head)
    return tokens * (cfg.n_layers * block + head)


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
) -> MemoryEstimate:
    """Estimate the peak GPU memory of training `cfg` (see the module docstring for the terms).

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
    n = count_params(cfg) if n_params is None else n_params
    trainable = int(n * trainable_fraction)
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
