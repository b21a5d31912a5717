"""Memory probes for the estimator (nord.memory): what training steps really hold at their peak.

`peak_rss_growth`: real fp32 AdamW steps (`nord.train.train_steps`) in a fresh process,

    peak growth = VmHWM over the steps − VmRSS before the model is built

The kernel's high-water mark (reset through /proc/self/clear_refs) sees every peak, however short. Two
things that are not the step's tensors are kept out: glibc's heap slack (its mmap threshold is fixed at
64 KiB, so a freed tensor's pages go back to the OS at once; with glibc's defaults RSS reads up to ~25%
higher on `small`, docs/benchmarks/t4_fit.md) and library state allocated lazily at the shapes' first use
(BLAS packing buffers, a few MB): a throwaway step of the same model and batch runs first. The steps after
the first are the steady state the estimator describes (the optimizer's moments exist).

`peak_allocated_bytes`: the bytes torch itself allocates in one steady-state step, in this process (the
profiler's allocation events), also under CPU fp16 autocast: the worker's CUDA path, on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MMAP_THRESHOLD = 64 * 1024  # bytes: every activation-sized tensor gets its own mapping


def peak_rss_growth(
    recipe: str,
    batch: int,
    seq: int,
    *,
    count: int = 1,
    shards: tuple[int, ...] = (0,),
    activation_checkpointing: bool = False,
    steps: int = 3,
    glibc_defaults: bool = False,
) -> int:
    """Bytes of peak RSS growth while building `recipe` and training `shards` of `count` for `steps` steps
    (`glibc_defaults`: leave the mmap threshold alone, so heap slack is counted too)."""
    spec = {
        "recipe": recipe,
        "batch": batch,
        "seq": seq,
        "count": count,
        "shards": list(shards),
        "checkpointing": activation_checkpointing,
        "steps": steps,
        "glibc_defaults": glibc_defaults,
    }
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth"]


def training_step(model, optimizer, x, y, *, fp16: bool) -> None:
    """One step of `nord.train.train_steps` (which autocasts on CUDA only); under CPU fp16 autocast if
    `fp16`."""
    import torch

    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        out = model(x, y)
        objective = out.loss + out.reg_loss
    objective.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del out, objective  # after the step, as train_steps does


def peak_allocated_bytes(model, optimizer, x, y, *, fp16: bool) -> int:
    """Peak bytes allocated during one `training_step`: what it starts with (parameters, optimizer state)
    plus the highest sum of the profiler's allocation events. Call it after a first step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    held = sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        training_step(model, optimizer, x, y, fp16=fp16)
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return held + peak


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _measure(
    recipe: str, batch: int, seq: int, count: int, shards: list[int], checkpointing: bool, steps: int,
    glibc_defaults: bool,
) -> int:  # fmt: skip
    import ctypes
    import gc
    import itertools

    libc = ctypes.CDLL("libc.so.6")
    if not glibc_defaults:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; fixing it also stops glibc from raising it

    import torch

    from nord.config import TrainConfig
    from nord.model import NordLM
    from nord.recipes import get_config
    from nord.shards import ShardConfig, freeze_outside, trained_names
    from nord.train import make_optimizer, train_steps

    torch.set_num_threads(1)
    cfg = get_config(recipe)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def train(n: int) -> None:
        model = NordLM(cfg, activation_checkpointing=checkpointing)
        freeze_outside(model, trained_names(model.param_spec(), cfg, ShardConfig(count=count), shards))
        optimizer = make_optimizer(model, TrainConfig(), "cpu")
        batches = itertools.repeat((tokens[:, :-1], tokens[:, 1:]))
        train_steps(model, optimizer, batches, n, grad_clip=1.0, device="cpu", progress=False)

    train(1)
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    train(steps)
    return _status("VmHWM") - before


if __name__ == "__main__":
    print(json.dumps({"peak_growth": _measure(**json.loads(sys.argv[1]))}))
