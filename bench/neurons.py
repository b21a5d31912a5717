"""Forward+backward time of one spiking layer: dynamic-decay (parallel scan) vs LIF (sequential) vs PSN.

    dynamic  DynamicDecayNeuron: input-dependent decay, eager gates + chunked scan (NORD_NEURON_KERNEL=eager)
    kernel   the same layer through the compiled C++ kernel (nord.neurons.fused; CPU only, compiled before
             timing): gates, scan and backward each in one pass over time
    lif      LIFNeuron: soft reset, one Python step per token (autograd through the loop)
    psn      PSN-style (Fang et al. 2023): H = W·X over time with a learned lower-triangular T×T matrix W,
             spikes Θ(H − θ); O(T²) time and memory, skipped where W and its gradient exceed --psn-max-gib

Every size keeps B·T·N fixed (--elements, default 2^22: one 16 MiB float32 activation), with N = --dim and
B = elements / (T·N); where that would make B < 1, B = 1 and N = elements / T. So the columns compare cost
per neuron-step as T grows. Loss = Σ spikes·g (random g), so backward runs through the surrogates.
Keep one activation ≤ 32 MiB on Linux: glibc serves larger blocks with fresh mmaps, and the page faults
then cost the full-sequence layers (not LIF's small per-step tensors) ~4× CPU time.

With --baseline REV the dynamic and LIF layers of commit REV are measured too, length by length right after
this tree's: a temporary `git worktree` of REV (removed afterwards) runs this script with the old `nord` in
a subprocess. Its LIF/dyn ratio is taken inside its own process, so the two ratios compare like for like.

    python bench/neurons.py [--quick] [--device cuda] [--baseline b8aea4c] [--out bench/results/neurons.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nord.neurons import DynamicDecayNeuron, LIFNeuron, spike

try:  # a --baseline tree from before the kernel has no nord.neurons.fused
    from nord.neurons import fused
except ImportError:
    fused = None
KERNEL_ENV = "NORD_NEURON_KERNEL"

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _revision import older_tree  # noqa: E402


class PSNLayer(nn.Module):
    """Parallel spiking neuron: H_t = Σ_{s≤t} W_ts X_s, S_t = Θ(H_t − θ); W is T×T (fixed max length)."""

    def __init__(self, dim: int, seq_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(seq_len) + torch.randn(seq_len, seq_len) / seq_len)
        self.threshold = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.einsum("ts,bsn->btn", self.weight.tril(), x)  # (B, T, N)
        return spike(h - self.threshold), h


def make_step(layer: nn.Module, x: torch.Tensor, kernel_mode: str | None = None):
    """A closure running one forward + backward of `layer` on `x` with a fixed random upstream gradient,
    with NORD_NEURON_KERNEL set to `kernel_mode` (if given) for its dynamic layer."""
    upstream = torch.randn_like(x)

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        if kernel_mode:  # read by the layer at each call; the other layers ignore it
            os.environ[KERNEL_ENV] = kernel_mode
        (layer(x)[0] * upstream).sum().backward()

    return step


def time_interleaved(steps: dict, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per step; the layers take turns so they share the same load."""
    for step in steps.values():
        step()  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {n: {"wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n])} for n in steps}


def measure_baseline(tree: Path, T: int, args, out: Path) -> dict:
    """Dynamic and LIF at length T with the `nord` of the worktree `tree`, in a subprocess of this script."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--lengths", str(T), "--psn-max-gib", "0",
           "--elements", str(args.elements), "--dim", str(args.dim), "--repeats", str(args.repeats),
           "--chunk-size", str(args.chunk_size), "--device", args.device, "--threads", str(args.threads),
           "--no-kernel", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(cmd, check=True, capture_output=True, cwd=tree, env=env)
    row = json.loads(out.read_text())["rows"][0]
    return {"dynamic": row["dynamic"], "lif": row["lif"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--elements", type=int, default=2**22, help="B·T·N, kept fixed across lengths")
    parser.add_argument("--dim", type=int, default=512, help="N neurons (smaller where B would be < 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--psn-max-gib", type=float, default=1.0, help="skip PSN when 3·T²·4 bytes exceed it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="T in {256, 1024}, B·T·N = 2^19, 1 repeat")
    parser.add_argument("--baseline", default="", help="also measure dynamic and LIF at this commit")
    parser.add_argument("--no-kernel", action="store_true", help="skip the compiled kernel's column")
    parser.add_argument("--out", type=Path, default=Path("bench/results/neurons.json"))
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.elements, args.repeats = [256, 1024], 2**19, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kernel = fused is not None and device.type == "cpu" and not args.no_kernel
    if kernel:
        fused.kernel(required=True)  # compile (or load from the cache) before anything is timed

    with tempfile.TemporaryDirectory(prefix="nord-baseline-") as tmp, older_tree(args.baseline) as tree:
        rows = []
        for T in tqdm(args.lengths, desc="lengths"):
            B = max(1, args.elements // (T * args.dim))
            N = args.elements // (B * T)
            x = torch.randn(B, T, N, device=device, requires_grad=True)
            dynamic = DynamicDecayNeuron(N, chunk_size=args.chunk_size).to(device)
            steps = {"dynamic": make_step(dynamic, x, "eager" if kernel else None)}
            if kernel:
                steps["kernel"] = make_step(dynamic, x, "cpp")
            steps["lif"] = make_step(LIFNeuron(N).to(device), x)
            # PSN's T×T weight, its gradient and the masked copy must fit --psn-max-gib
            if 3 * T * T * 4 <= args.psn_max_gib * 2**30:
                steps["psn"] = make_step(PSNLayer(N, T).to(device), x)
            times = time_interleaved(steps, args.repeats, device)
            del x, steps
            row = {"T": T, "B": B, "N": N, **{n: times.get(n) for n in ("dynamic", "kernel", "lif", "psn")}}
            if args.baseline:
                row["baseline"] = measure_baseline(tree, T, args, Path(tmp) / f"T{T}.json")
            rows.append(row)

    names = ("dynamic", "kernel", "lif", "psn") if kernel else ("dynamic", "lif", "psn")
    fast = "kernel" if kernel else "dynamic"  # the ratios' denominator: the layer as training runs it
    ratios = [("lif", "dynamic"), ("lif", "kernel"), ("psn", "kernel")] if kernel else [("lif", "dynamic"),
              ("psn", "dynamic")]  # fmt: skip
    short = {"dynamic": "dyn", "kernel": "kern", "lif": "LIF", "psn": "PSN"}
    header = f"{'T':>6} {'B':>3} {'N':>4} |"
    for key in ("CPU", "wall"):
        header += f" {'dyn ' + key:>9}" + "".join(f" {short[n]:>8}" for n in names[1:])
        header += "".join(f" {short[a] + '/' + short[b]:>9}" for a, b in ratios) + " |"
    if args.baseline:
        header += f" {'dyn@' + args.baseline[:7] + ' CPU':>16} {'LIF/dyn':>7} {'old/' + short[fast]:>8} |"
    print("times in ms (median); CPU = user + sys time of this process, robust to other load")
    print(header)
    print("-" * len(header))
    for r in rows:
        line = f"{r['T']:>6} {r['B']:>3} {r['N']:>4} |"
        for key in ("cpu_s", "wall_s"):
            ms = [
                f"{r[n][key] * 1e3:{9 if n == 'dynamic' else 8}.1f}" if r[n] else f"{'skipped':>8}"
                for n in names
            ]
            shares = [f"{r[a][key] / r[b][key]:9.2f}" if r[a] else f"{'-':>9}" for a, b in ratios]
            line += f" {' '.join(ms)} {' '.join(shares)} |"
        if args.baseline:
            old = r["baseline"]
            old_ratio = old["lif"]["cpu_s"] / old["dynamic"]["cpu_s"]
            speedup = old["dynamic"]["cpu_s"] / r[fast]["cpu_s"]
            line += f" {old['dynamic']['cpu_s'] * 1e3:16.1f} {old_ratio:7.2f} {speedup:8.2f} |"
        print(line)
    print(f"PSN skipped where 3·T²·4 bytes > {args.psn_max_gib} GiB (T×T weight, gradient, masked copy).")
    if args.baseline:
        print(f"dyn@{args.baseline}: the dynamic layer at that commit, LIF/dyn measured in its own process.")
    meta = {
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "elements": args.elements,
        "baseline": args.baseline,
        "kernel": kernel,
        "loadavg_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
