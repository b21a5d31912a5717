"""Does a worker's training fit a free T4? Real training steps, peak memory against the estimator.

On CUDA, with the process capped at a T4's 15 GiB (`torch.cuda.set_per_process_memory_fraction`), the
worker's code path (nord.shards freeze, fp16 autocast + GradScaler, bitsandbytes 8-bit AdamW, activation
checkpointing where the plan needs it, nord.train.train_steps) runs
    nord-1b, one shard (the top blocks of --shard-count)     batch 1 x 1024
    base, whole                                              batch 8 x 512
On CPU the same path runs `small` (one shard and whole, fp32 AdamW) and says the GPU rows need a GPU.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the peak growth of anonymous RSS.

    python bench/t4_fit.py [--steps 4] [--out bench/results/t4_fit.json]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import threading
import time
from pathlib import Path

import torch

from nord.config import TrainConfig
from nord.memory import GIB, T4_USABLE_BYTES
from nord.model import NordLM
from nord.recipes import get_config
from nord.shards import ShardConfig, freeze_outside, plan_for, trained_names, worker_sizing
from nord.train import make_optimizer, train_steps


def anon_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakRss:
    """Peak growth of anonymous RSS over a `with` block (a thread polls /proc every 0.2 ms)."""

    def __enter__(self) -> PeakRss:
        self.before, self.peak, self._done = anon_rss(), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, anon_rss())
            time.sleep(0.0002)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())
        self.growth = self.peak - self.before


def run_row(recipe: str, shard_cfg: ShardConfig, shards: tuple[int, ...], *, batch: int, seq: int,
            steps: int, device: torch.device, budget: int) -> dict:  # fmt: skip
    cfg = dataclasses.replace(get_config(recipe), max_seq_len=seq)
    cuda = device.type == "cuda"
    sizing = worker_sizing(batch, seq, device)
    plan = plan_for(cfg, shard_cfg, shards, budget_bytes=budget, **sizing)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)

    def batches():
        while True:
            yield tokens[:, :-1], tokens[:, 1:]

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    meter = PeakRss() if not cuda else None
    if meter:
        meter.__enter__()
    torch.manual_seed(0)
    model = NordLM(cfg, activation_checkpointing=plan.activation_checkpointing).to(device)
    names = trained_names(model.param_spec(), cfg, shard_cfg, shards)
    freeze_outside(model, names)
    optimizer = make_optimizer(model, TrainConfig(), device, eight_bit=cuda)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    it = batches()
    train_steps(model, optimizer, it, 1, scaler=scaler, grad_clip=1.0, device=device, progress=False)  # warm
    stats = train_steps(model, optimizer, it, steps, scaler=scaler, grad_clip=1.0, device=device)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        predicted = plan.estimate.total
    else:
        meter.__exit__(None, None, None)
        peak = meter.growth
        predicted = plan.estimate.total - plan.estimate.overhead  # no CUDA context on CPU
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "recipe": recipe,
        "shards": f"{','.join(map(str, shards))} of {shard_cfg.count}",
        "params_M": round(model.num_params() / 1e6, 1),
        "trained_M": round(trainable / 1e6, 1),
        "batch": f"{batch}x{seq}",
        "checkpointing": plan.activation_checkpointing,
        "optimizer": sizing["optimizer"],
        "peak_GiB": round(peak / GIB, 3),
        "estimate_GiB": round(predicted / GIB, 3),
        "measured/estimate": round(peak / predicted, 3),
        "tokens_per_s": round(stats.tokens / stats.seconds, 1),
        "loss": round(stats.loss, 3),
    }
    del model, optimizer, stats
    gc.collect()
    if not cuda:  # hand freed heap back to the OS, so the next row's RSS growth starts from scratch
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return row


def warm_up(device: torch.device) -> None:
    """One step of a micro model, so lazy library initialisation is not counted in the first row."""
    micro = dataclasses.replace(get_config("tiny"), vocab_size=64, d_model=16, d_mlp=32, n_memory_slots=4)
    model = NordLM(micro).to(device)
    x = torch.randint(0, 64, (1, 8), device=device)
    optimizer = make_optimizer(model, TrainConfig(), device, eight_bit=device.type == "cuda")
    train_steps(model, optimizer, iter([(x, x)]), 1, grad_clip=1.0, device=device, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=4, help="timed steps per row (after one warm-up step)")
    p.add_argument("--shard-count", type=int, default=4, help="shards of the run; the top one is trained")
    p.add_argument("--cap-gib", type=float, default=T4_USABLE_BYTES / GIB, help="GPU memory cap (a T4's)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--out", default="bench/results/t4_fit.json")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    count = ShardConfig(count=args.shard_count)
    everything = tuple(range(args.shard_count))
    top = (args.shard_count - 1,)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(args.cap_gib * GIB)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        rows_spec = [("nord-1b", top, 1, 1024), ("base", everything, 8, 512)]
        machine = torch.cuda.get_device_name(device) + f", capped at {args.cap_gib:.1f} GiB"
    else:
        # A fixed mmap threshold: glibc otherwise raises it after big frees and serves later tensors from
        # a heap that keeps freed pages resident, so RSS would count allocator slack as training memory.
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
        budget = int(args.cap_gib * GIB)
        rows_spec = [("small", top, 4, 128), ("small", everything, 4, 128)]
        machine = f"CPU, {args.threads} threads"
        print("no GPU here: CPU rows on `small`; the nord-1b / base rows under a 15 GiB cap need a GPU")
    warm_up(device)
    rows = [
        run_row(r, count, s, batch=b, seq=t, steps=args.steps, device=device, budget=budget)
        for r, s, b, t in rows_spec
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
