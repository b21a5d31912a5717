"""Training-memory estimator: does a config train on a 16 GB T4?

Peak memory of a training step once the optimizer's moments exist (every step after the first):

    total          = params + optimizer + max(backward start, backward end) + CUDA context
    params         = 4 B/param (fp32 weights)
    optimizer      = AdamW 8 B/trained param (two fp32 moments); bitsandbytes 8-bit AdamW 2 B (+ scales)
    backward start = casts + tokens·saved + head         the activations at their largest
    backward end   = grads + tokens·s·V + step           every gradient formed (4 B/trained param)

Gradients and the saved activations never all coexist: backward frees each block's saved tensors as it
forms that block's gradients, and the gradients are freed after each step. With V the vocabulary, D the
width, F the MLP width, M the memory slots, L the blocks, s the bytes of a logit (2 under fp16 autocast,
else 4), and `saved` per token:

    saved   what autograd saves (`activation_bytes`): L'·(c_D·D + c_F·F + c_M·M) + 4·V (the fp32
            log-softmax) + h_D·D (final norm and head, if the head trains). L' = L − the first trained
            block: nord.shards runs the frozen blocks below it without a graph, and a frozen block above
            it saves only (c'_D·D + c'_F·F + c'_M·M). With activation checkpointing L'·4·D (each block's
            fp32 input) takes the place of the blocks' terms
    casts   fp16 only: 2 B per weight of the head and of each graph block's matrices (autocast's copies,
            saved for backward); with checkpointing only the head's
    head    tokens·V·(8 + s): the logits and the fp32 gradients of the log-softmax and of the logits;
            if the head trains, at least tokens·V·(2s − 4) + 4·V·D (its weight's gradient forming beside
            the logits and their gradient); with checkpointing, at least tokens·(s·V + c_D·D + c_F·F +
            c_M·M) + the block's casts (a block recomputed beside the logits)
    step    4 B × (2·V·D if the head trains, else 3·D·max(D, F)): the tied embedding's gradient formed
            twice (head and lookup) while it accumulates, or AdamW's sqrt(v)/c of the largest tensor
            beside the previous tensor's (a block's mlp_out follows its same-sized mlp_in)

The coefficients c, c', h_D count the tensors autograd saves (tests/nord/test_memory.py checks them with
torch's saved-tensor hooks). The estimate matches the bytes torch allocates in CPU training steps within
1.5% for tiny and small, whole and sharded, with and without checkpointing, fp32 and fp16 autocast; the
tests hold it to the peak RSS of such steps (tests/rss_probe.py, docs/benchmarks/t4_fit.md).
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
BLOCK_BYTES = {False: (52, 8, 8), True: (46, 6, 6)}
# The same for a frozen block that backward passes through: no weight gradients, so matmuls keep only
# what the input gradient needs (measured the same way, three shapes, residual < 2 B).
FROZEN_BLOCK_BYTES = {False: (32, 4, 4), True: (28, 4, 4)}
# Per token and unit of D: what the final norm and a training head save, h_D (a frozen one saves < 1 B).
HEAD_BYTES = {False: 12, True: 10}


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    params: int  # bytes, held throughout
    optimizer: int  # held throughout
    grads: int  # every trained parameter's gradient (part of backward_end)
    activations: int  # what autograd saves in the forward pass (part of backward_start)
    backward_start: int  # live as the head's backward runs: activations at their largest
    backward_end: int  # live as backward ends: every gradient
    overhead: int
    total: int  # params + optimizer + max(backward_start, backward_end) + overhead
    fits_t4: bool

    def table(self) -> str:
        names = ("params", "optimizer", "grads", "activations", "backward_start", "backward_end", "overhead")
        lines = [f"{k:<15} {getattr(self, k) / GIB:8.2f} GiB" for k in names]
        total = f"{'total':<15} {self.total / GIB:8.2f} GiB   params + optimizer + max(backward_*) + overhead"
        return "\n".join([*lines, total, f"fits a 16 GB T4: {'yes' if self.fits_t4 else 'no'}"])


def count_params(cfg: ModelConfig) -> int:
    """Exact trainable parameter count of `NordLM(cfg)` (built on the meta device: no memory used)."""
    import torch

    from nord.model import NordLM

    with torch.device("meta"):
        return NordLM(cfg).num_params()


def _block_bytes(cfg: ModelConfig, coefficients: tuple[int, int, int]) -> int:
    per_d, per_f, per_m = coefficients
    return per_d * cfg.d_model + per_f * cfg.d_mlp + per_m * cfg.n_memory_slots


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
    """Bytes autograd saves for backward in one forward pass of `batch_size` windows of `seq_len` tokens
    (tokens · saved in the module docstring), when blocks from `first_trained_block` up need a graph,
    `frozen_blocks` of them frozen."""
    layers = cfg.n_layers - first_trained_block
    head = 4 * cfg.vocab_size + (HEAD_BYTES[fp16] * cfg.d_model if head_trained else 0)
    if activation_checkpointing:
        blocks = layers * 4 * cfg.d_model
    else:
        trained, frozen = _block_bytes(cfg, BLOCK_BYTES[fp16]), _block_bytes(cfg, FROZEN_BLOCK_BYTES[fp16])
        blocks = (layers - frozen_blocks) * trained + frozen_blocks * frozen
    return batch_size * seq_len * (blocks + head)


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
    """Estimate the peak memory of a training step of `cfg` (the formula is in the module docstring).

    `trainable_params` (exact) or `trainable_fraction` say how many parameters have gradients and
    optimizer states; `first_trained_block` is the lowest block backward goes through, `frozen_blocks`
    the frozen ones above it, `head_trained` whether the embedding, final norm and head train
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
    V, D, L = cfg.vocab_size, cfg.d_model, cfg.n_layers
    tokens, logit = batch_size * seq_len, 2 if fp16 else 4
    graph_blocks = L - first_trained_block

    params = 4 * n
    # 8-bit AdamW: two uint8 moments plus one fp32 absmax per 2048-value block and moment.
    opt = trainable * (8 if optimizer == "adamw" else 2) + (0 if optimizer == "adamw" else trainable // 256)
    grads = 4 * trainable

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
    block_matrices = 3 * D * D + 2 * cfg.n_memory_slots * D + 2 * D * cfg.d_mlp  # weights autocast casts
    cast = 2 if fp16 else 0  # bytes of autocast's fp16 copy of a weight
    casts = cast * (V * D + (0 if activation_checkpointing else graph_blocks * block_matrices))
    head = tokens * V * (8 + logit)
    if head_trained:
        head = max(head, tokens * V * (2 * logit - 4) + 4 * V * D)
    if activation_checkpointing:
        recompute = tokens * (logit * V + _block_bytes(cfg, BLOCK_BYTES[fp16])) + cast * block_matrices
        head = max(head, recompute)
    backward_start = casts + acts + head

    largest = V * D if head_trained else D * max(D, cfg.d_mlp)
    step = 4 * (2 * largest + (0 if head_trained else largest))
    backward_end = grads + tokens * logit * V + step

    overhead = CUDA_CONTEXT_BYTES
    total = params + opt + max(backward_start, backward_end) + overhead
    return MemoryEstimate(
        params=params,
        optimizer=opt,
        grads=grads,
        activations=acts,
        backward_start=backward_start,
        backward_end=backward_end,
        overhead=overhead,
        total=total,
        fits_t4=total <= T4_USABLE_BYTES,
    )


CUDA_PLANNING_SHARE = 0.9


def device_memory_bytes(device) -> int:
    """Memory a training run may plan for on `device`: 90% of the GPU's total, or the host's available RAM.

    The estimator counts tensors; on a GPU the caching allocator's fragmentation and cuBLAS workspaces come
    on top, and the CUDA rows of bench/t4_fit have not been measured yet, hence the 10% held back.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(CUDA_PLANNING_SHARE * torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux: the physical memory
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
