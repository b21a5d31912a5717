"""Peak growth of anonymous resident memory during one real fp32 AdamW step, measured in a fresh process.

Linux /proc/self/status RssAnon, polled by a thread every 0.2 ms; file-backed pages such as libtorch's
code are left out, since the kernel may evict and re-fault them. A micro model with the same shard
selection first warms every code path, so lazy library initialisation is not counted. Used by the
memory-estimator tests of the whole model (count=1, shard 0) and of shard subsets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def peak_rss_growth(
    recipe: str, batch: int, seq: int, *, count: int = 1, shards: tuple[int, ...] = (0,)
) -> int:
    """Bytes of peak RssAnon growth while building `recipe` and training `shards` of `count` for one step."""
    argv = [recipe, str(batch), str(seq), str(count), ",".join(map(str, shards))]
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth"]


def _measure(recipe: str, batch: int, seq: int, count: int, shards: list[int]) -> int:
    import dataclasses
    import threading
    import time

    import torch

    from nord.model import NordLM
    from nord.recipes import get_config
    from nord.shards import ShardConfig, freeze_outside, trained_names

    torch.set_num_threads(1)

    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def one_step(cfg, b: int, t: int) -> None:
        model = NordLM(cfg)
        freeze_outside(model, trained_names(model.param_spec(), cfg, ShardConfig(count=count), shards))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        x = torch.randint(0, cfg.vocab_size, (b, t))
        out = model(x, x)
        (out.loss + out.reg_loss).backward()
        opt.step()

    micro = dataclasses.replace(get_config("tiny"), vocab_size=64, d_model=16, d_mlp=32, n_memory_slots=4)
    one_step(micro, 1, 8)
    before, peak, done = anon(), [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0002)

    watcher = threading.Thread(target=poll)
    watcher.start()
    one_step(get_config(recipe), batch, seq)
    done.set()
    watcher.join()
    return max(peak[0], anon()) - before


if __name__ == "__main__":
    name, b, t, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps({"peak_growth": _measure(name, b, t, n, [int(s) for s in sys.argv[5].split(",")])}))
