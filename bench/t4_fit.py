"""Does a worker's training fit a free T4? Real training steps, peak memory against the estimator.

On CUDA, with the process capped at a T4's 15 GiB (`torch.cuda.set_per_process_memory_fraction`), the
worker's code path (nord.shards freeze, fp16 autocast + GradScaler, bitsandbytes 8-bit AdamW, activation
checkpointing where the plan needs it, nord.train.train_steps) runs
    nord-1b, one shard (the top blocks of --shard-count)     batch 1 x 1024
    nord-1b, whole                                           batch 1 x 1024
    base, whole                                              batch 8 x 512
and torch.cuda.max_memory_allocated is set against the estimate.

On CPU (no GPU here) it checks the estimator on tiny (8 x 64) and small (4 x 128): the top, a middle and
the embedding/head shard of --shard-count and the whole model, each without and with activation
checkpointing, fp32 AdamW as a CPU worker trains. Per row, beside nord.memory's estimate:
    allocated       peak bytes torch allocates in a steady-state step (profiler allocation events)
    RSS             peak RSS growth of fresh-process steps (tests/rss_probe.py: glibc mmap threshold
                    64 KiB, so freed tensors leave RSS; lazily sized library buffers warmed first)
    RSS glibc       the same with glibc's default allocator settings (its heap slack counted)
    fp16 allocated  the GPU worker's fp16 autocast path run on the CPU, against the fp16 estimate
The neuron runs eager here (NORD_NEURON_KERNEL=eager unless set), as on the T4: the CPU kernel saves
4 B per token and D less per block than the estimate counts.

    python bench/t4_fit.py [--steps 3] [--out bench/results/t4_fit.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from nord.config import TrainConfig
from nord.memory import GIB, T4_USABLE_BYTES
from nord.model import NordLM
from nord.recipes import get_config
from nord.shards import (
    ShardConfig,
    estimate_shard_memory,
    freeze_outside,
    plan_for,
    trained_names,
    worker_sizing,
)
from nord.train import make_optimizer, train_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' memory probes
from rss_probe import peak_allocated_bytes, peak_rss_growth, training_step  # noqa: E402

MB = 1e6
CPU_ROWS = (("tiny", 8, 64), ("small", 4, 128))


def batches(cfg, batch: int, seq: int, device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    while True:
        yield tokens[:, :-1], tokens[:, 1:]


def build(cfg, shard_cfg: ShardConfig, shards, *, checkpointing: bool, device):
    torch.manual_seed(0)
    model = NordLM(cfg, activation_checkpointing=checkpointing).to(device)
    freeze_outside(model, trained_names(model.param_spec(), cfg, shard_cfg, shards))
    return model, make_optimizer(model, TrainConfig(), device, eight_bit=torch.device(device).type == "cuda")


def gpu_row(recipe: str, shard_cfg: ShardConfig, shards, *, batch: int, seq: int, steps: int, device,
            budget: int) -> dict:  # fmt: skip
    cfg = dataclasses.replace(get_config(recipe), max_seq_len=seq)
    plan = plan_for(cfg, shard_cfg, shards, budget_bytes=budget, **worker_sizing(batch, seq, device))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model, optimizer = build(
        cfg, shard_cfg, shards, checkpointing=plan.activation_checkpointing, device=device
    )
    scaler, it = torch.amp.GradScaler("cuda"), batches(cfg, batch, seq, device)
    train_steps(model, optimizer, it, 1, scaler=scaler, grad_clip=1.0, device=device, progress=False)  # warm
    stats = train_steps(model, optimizer, it, steps, scaler=scaler, grad_clip=1.0, device=device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {
        "recipe": recipe,
        "shards": f"{','.join(map(str, shards))} of {shard_cfg.count}",
        "trained_M": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1),
        "batch": f"{batch}x{seq}",
        "checkpointing": plan.activation_checkpointing,
        "peak_GiB": round(peak / GIB, 3),
        "estimate_GiB": round(plan.estimate.total / GIB, 3),
        "measured/estimate": round(peak / plan.estimate.total, 3),
        "tokens_per_s": round(stats.tokens / stats.seconds, 1),
    }


def cpu_row(recipe: str, shard_cfg: ShardConfig, shards, *, batch: int, seq: int, steps: int,
            checkpointing: bool) -> dict:  # fmt: skip
    cfg = get_config(recipe)

    def estimate(fp16: bool) -> int:
        est = estimate_shard_memory(
            cfg, shard_cfg, shards, batch_size=batch, seq_len=seq, fp16=fp16, optimizer="adamw",
            activation_checkpointing=checkpointing,
        )  # fmt: skip
        return est.total - est.overhead  # no CUDA context on CPU

    model, optimizer = build(cfg, shard_cfg, shards, checkpointing=checkpointing, device="cpu")
    it = batches(cfg, batch, seq, "cpu")
    train_steps(model, optimizer, it, 1, grad_clip=1.0, device="cpu", progress=False)  # warm
    stats = train_steps(model, optimizer, it, steps, grad_clip=1.0, device="cpu")
    allocated = peak_allocated_bytes(model, optimizer, *next(it), fp16=False)
    model, optimizer = build(cfg, shard_cfg, shards, checkpointing=checkpointing, device="cpu")
    training_step(model, optimizer, *next(it), fp16=True)  # the optimizer's moments exist from here on
    allocated16 = peak_allocated_bytes(model, optimizer, *next(it), fp16=True)
    probe = {"count": shard_cfg.count, "shards": tuple(shards), "activation_checkpointing": checkpointing}
    rss = peak_rss_growth(recipe, batch, seq, **probe)
    rss_glibc = peak_rss_growth(recipe, batch, seq, glibc_defaults=True, **probe)
    est, est16 = estimate(False), estimate(True)
    return {
        "recipe": recipe,
        "shards": f"{','.join(map(str, shards))} of {shard_cfg.count}",
        "trained_M": round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2),
        "batch": f"{batch}x{seq}",
        "ckpt": checkpointing,
        "estimate_MB": round(est / MB, 1),
        "allocated_MB": round(allocated / MB, 1),
        "alloc/est": round(allocated / est, 3),
        "RSS_MB": round(rss / MB, 1),
        "RSS/est": round(rss / est, 3),
        "RSS_glibc_MB": round(rss_glibc / MB, 1),
        "RSS_glibc/est": round(rss_glibc / est, 3),
        "fp16_est_MB": round(est16 / MB, 1),
        "fp16_alloc/est": round(allocated16 / est16, 3),
        "tokens_per_s": round(stats.tokens / stats.seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (after one warm-up step)")
    p.add_argument("--shard-count", type=int, default=4, help="shards of the run")
    p.add_argument("--cap-gib", type=float, default=T4_USABLE_BYTES / GIB, help="GPU memory cap (a T4's)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--out", default="bench/results/t4_fit.json")
    args = p.parse_args()
    os.environ.setdefault("NORD_NEURON_KERNEL", "eager")  # the T4's path; the fresh-process probes inherit it
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    count = ShardConfig(count=args.shard_count)
    everything = tuple(range(args.shard_count))
    top = (args.shard_count - 1,)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(args.cap_gib * GIB)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        machine = torch.cuda.get_device_name(device) + f", capped at {args.cap_gib:.1f} GiB"
        spec = [("nord-1b", top, 1, 1024), ("nord-1b", everything, 1, 1024), ("base", everything, 8, 512)]
        rows = [
            gpu_row(r, count, s, batch=b, seq=t, steps=args.steps, device=device, budget=budget)
            for r, s, b, t in spec
        ]
    else:
        machine = f"CPU, {args.threads} threads"
        print("no GPU here: the estimator against CPU steps of tiny and small; the T4 rows need a GPU")
        shard_sets = [top, (args.shard_count // 2,), (0,), everything]
        rows = [
            cpu_row(recipe, count, shards, batch=b, seq=t, steps=args.steps, checkpointing=ckpt)
            for recipe, b, t in CPU_ROWS
            for shards in shard_sets
            for ckpt in (False, True)
        ]
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print(f"machine: {machine}")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
