"""Training: optimizer, LR schedule, the inner step loop, held-out evaluation, and `nord train`.

    objective = cross-entropy + λ · mean_l (rate_l − target)²
    lr(s)     = base · (s + 1) / warmup                                       s < warmup
              = base · (m + (1 − m) · ½ (1 + cos π p)),  p = (s − warmup) / (total − warmup)

`train_steps` is the loop both `nord train` and the worker's inner loop run: fp16 autocast with a
GradScaler on CUDA (the T4 has no bf16), fp32 on CPU. `nord train` writes to its --out directory:
    model.safetensors   weights + model config + tokenizer path and sha256 (what `nord generate/eval` read)
    train_state.pt      optimizer, scaler, step and history, tied to the weights by their hash (--resume)
    loss.png            training and validation loss against steps
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nord.checkpoint import read_metadata
from nord.config import TrainConfig
from nord.errors import CheckpointError, ConfigError, DataError
from nord.evaluate import EvalResult, evaluate_tokens
from nord.fsutil import atomic_path
from nord.model import NordLM, load_model, resolve_device, save_model
from nord.recipes import RECIPES, get_config

log = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class StepStats:
    loss: float  # mean cross-entropy over the steps (nats/token)
    reg_loss: float  # mean firing-rate penalty
    firing_rate: float  # mean overall firing rate
    memory_share: float  # mean share of the residual writes made by the persistent memory
    tokens: int
    seconds: float


def make_optimizer(
    model: torch.nn.Module, train_cfg: TrainConfig, device: torch.device | str, *, eight_bit: bool = False
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; bitsandbytes 8-bit AdamW (CUDA only) if `eight_bit`."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train_cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if not eight_bit:
        return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=(0.9, 0.95))
    if torch.device(device).type != "cuda":
        raise ConfigError("8-bit AdamW (bitsandbytes) needs a CUDA device; use plain AdamW on CPU")
    import bitsandbytes as bnb  # lazy: it imports torch._dynamo and probes CUDA

    return bnb.optim.AdamW8bit(groups, lr=train_cfg.lr, betas=(0.9, 0.95))


def cosine_lr(
    base_lr: float, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.1
) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to `min_ratio · base_lr` at `total_steps`."""

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return base_lr * (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def cpu_bf16_default() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), where bf16 autocast is the faster
    default; elsewhere it is emulated and slower than fp32."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch build without these probes
        return False


def train_steps(
    model: NordLM,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float,
    lr_fn: Callable[[int], float] | None = None,
    start_step: int = 0,
    device: torch.device | str,
    progress: bool = True,
    carry_state: bool = False,
    cpu_bf16: bool = False,
) -> StepStats:
    """Run `steps` optimizer steps on batches of (x, y) int64 (B, T); return their mean statistics.

    On CUDA the forward runs under fp16 autocast and `scaler` (created if None; pass one to keep its
    scale across calls) scales the loss; on CPU everything is fp32 unless `cpu_bf16` (bf16 autocast with
    the head in fp32: ~1.5–2× the tokens per CPU second where the CPU has AMX/AVX512-BF16, at a
    validation loss within the seed spread of fp32's, docs/benchmarks/model_step.md; `cpu_bf16_default`).
    With `carry_state` each step starts from the previous step's neuron state (detached: truncated
    backprop through time), so the batches must continue each other row by row (`stream_batches`);
    otherwise every window starts from zero state and slow channels never see what came before it.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and scaler is None:
        scaler = torch.amp.GradScaler("cuda")
    precision = torch.float16 if cuda else torch.bfloat16
    model.train()
    losses, regs, rates, shares, tokens = [], [], [], [], 0
    state = None
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress, leave=False)
    for i in bar:
        try:
            x, y = next(batches)
        except StopIteration:
            raise DataError(f"the batch iterator ran out after {i} of {steps} steps") from None
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if lr_fn is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_fn(start_step + i)
        with torch.autocast(device.type, dtype=precision, enabled=cuda or cpu_bf16):
            out = model(x, y, state=state)
            objective = out.loss + out.reg_loss
        if carry_state:
            state = [s.detach() for s in out.state]
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(optimizer)
        else:
            objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        regs.append(out.reg_loss.item())
        rates.append(out.rates["overall"].item())
        shares.append(out.memory_share.item())
        del out, objective  # the logits (B, T, V) would otherwise stay alive through the next forward
        tokens += x.numel()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:.0f}", rate=f"{rates[-1]:.3f}")
    n = max(1, len(losses))
    return StepStats(
        loss=sum(losses) / n,
        reg_loss=sum(regs) / n,
        firing_rate=sum(rates) / n,
        memory_share=sum(shares) / n,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def stream_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (x, y) int64 (B, T) where row b of each batch continues row b of the one before: B read
    heads at seeded random offsets, each advancing T tokens per batch and wrapping at the end of `tokens`
    (for `train_steps(carry_state=True)`)."""
    if not 1 <= seq_len < len(tokens):
        raise ConfigError(f"seq_len must be in [1, {len(tokens) - 1}] for these tokens, got {seq_len}")
    heads = np.random.default_rng(seed).integers(0, len(tokens), size=batch_size)
    offsets = np.arange(seq_len + 1)
    while True:
        rows = torch.from_numpy(np.take(tokens, heads[:, None] + offsets, mode="wrap").astype(np.int64))
        yield rows[:, :-1], rows[:, 1:]
        heads = (heads + seq_len) % len(tokens)


def evaluate(
    model: NordLM,
    corpus,
    split: str = "val",
    *,
    seq_len: int,
    max_batches: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Held-out loss / perplexity / bits per byte of a prepared corpus split, state carried across windows."""
    tokens = torch.from_numpy(getattr(corpus, split).astype("int64"))
    return evaluate_tokens(
        model,
        tokens,
        corpus.decode,
        seq_len=seq_len,
        batch_size=batch_size,
        max_windows=max_batches,
        device=device,
    )


# --- nord train -------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a spiking LM on one machine", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="small", help=f"recipe: {', '.join(RECIPES)} (default small)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", metavar="DIR", help="a corpus prepared by `nord data`")
    data.add_argument("--source", default="shakespeare", help="source to prepare (see `nord data prepare`)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when preparing --source")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoint, loss curve)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validations and checkpoints")
    p.add_argument("--eval-batches", type=int, default=20, help="validation windows per evaluation")
    p.add_argument("--dense", action="store_true", help="train the dense twin (no spikes) instead")
    p.add_argument("--eight-bit", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument(
        "--cpu-precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="on CPU: bf16 autocast (the head in fp32) or fp32; auto: bf16 where the CPU computes bf16 "
        "natively (AMX or AVX512-BF16: ~1.5-2x tokens/s, loss within the seed spread of fp32's, "
        "docs/benchmarks/model_step.md), else fp32. CUDA always uses fp16 autocast",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def _open_corpus(args: argparse.Namespace):
    from nord.data import DataConfig, load_corpus, prepare

    if args.data:
        return load_corpus(args.data)
    return prepare(DataConfig(source=args.source, vocab_size=args.vocab_size))


def _save(out: Path, model: NordLM, optimizer, scaler, step: int, history: dict, corpus, recipe: str) -> None:
    weights_hash = save_model(
        out / "model.safetensors",
        model,
        {
            "step": step,
            "recipe": recipe,
            "tokenizer_path": str((corpus.path / "tokenizer.json").resolve()),
            "tokenizer_sha256": corpus.tokenizer_hash,
        },
    )
    state = {
        "format_version": STATE_FORMAT_VERSION,
        "weights_hash": weights_hash,
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "history": history,
    }
    with atomic_path(out / "train_state.pt") as tmp:
        torch.save(state, tmp)
    plot_loss_curve(history, out / "loss.png")


def _resume(out: Path, cfg, device) -> tuple[NordLM, dict]:
    model_path, state_path = out / "model.safetensors", out / "train_state.pt"
    if not model_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"nothing to resume in {out}: model.safetensors and train_state.pt are needed")
    model, meta = load_model(model_path, device=device, expect=cfg)
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises several kinds for truncated or foreign files
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{state_path} is corrupt or not a Nord training state ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"{state_path} is not a Nord training state of format {STATE_FORMAT_VERSION}")
    if state.get("weights_hash") != meta.get("weights_hash"):
        raise CheckpointError(f"{state_path} belongs to other weights than {model_path} (interrupted save?)")
    return model, state


def run(args: argparse.Namespace) -> int:
    for name in ("steps", "batch_size", "seq_len", "eval_every"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    out = Path(args.out)
    if not args.resume and (out / "model.safetensors").exists():
        raise ConfigError(
            f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    corpus = _open_corpus(args)
    cfg = dataclasses.replace(
        get_config(args.model, vocab_size=corpus.vocab_size), max_seq_len=args.seq_len, spiking=not args.dense
    )
    train_cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    step, history = 0, {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "firing_rate": []}
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    if args.resume:
        model, state = _resume(out, cfg, device)
        optimizer = make_optimizer(model, train_cfg, device, eight_bit=args.eight_bit)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        step, history = int(state["step"]), state["history"]
        log.info("resuming %s at step %d", out, step)
    else:
        model = NordLM(cfg).to(device)
        optimizer = make_optimizer(model, train_cfg, device, eight_bit=args.eight_bit)
    model.activation_checkpointing = args.activation_checkpointing
    log.info("model %s: %.2fM parameters, vocab %d", args.model, model.num_params() / 1e6, cfg.vocab_size)
    lr_fn = cosine_lr(args.lr, warmup_steps=args.warmup, total_steps=args.steps)
    batches = iter(corpus.batches("train", args.batch_size, args.seq_len, seed=args.seed + step))
    cpu_bf16 = args.cpu_precision == "bf16" or (args.cpu_precision == "auto" and cpu_bf16_default())
    if device.type == "cpu":
        log.info("CPU precision: %s", "bf16 autocast (head in fp32)" if cpu_bf16 else "fp32")
    while step < args.steps:
        chunk = min(args.eval_every, args.steps - step)
        stats = train_steps(
            model, optimizer, batches, chunk, scaler=scaler, grad_clip=train_cfg.grad_clip,
            lr_fn=lr_fn, start_step=step, device=device, cpu_bf16=cpu_bf16,
        )  # fmt: skip
        step += chunk
        val = evaluate(model, corpus, seq_len=args.seq_len, max_batches=args.eval_batches, device=device)
        history["step"].append(step)
        history["train_loss"].append(stats.loss)
        history["firing_rate"].append(stats.firing_rate)
        history["val_step"].append(step)
        history["val_loss"].append(val.loss)
        print(
            f"step {step:6d}  train {stats.loss:.4f}  val {val.loss:.4f}  ppl {val.ppl:8.2f}  "
            f"bpb {val.bits_per_byte:.3f}  firing {stats.firing_rate:.3f}  "
            f"memory share {stats.memory_share:.2f}  {stats.tokens / stats.seconds:,.0f} tok/s"
        )
        _save(out, model, optimizer, scaler, step, history, corpus, args.model)
    weights_hash = read_metadata(out / "model.safetensors")["weights_hash"]
    print(f"checkpoint: {out / 'model.safetensors'} (step {step}, weights {weights_hash[:12]})")
    return 0


def plot_loss_curve(history: dict, path: Path) -> None:
    """Training and validation loss against steps, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step"], history["train_loss"], label="train")
    ax.plot(history["val_step"], history["val_loss"], label="validation", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
