"""How well decentralized sparse 4-bit training learns, and at how few bytes (`nord bench decentralized`).

The same spiking model, corpus, token budget and seeds in every setup; peers' shards are disjoint
(`Corpus.batches(..., shard=(i, K))`), and every setup sees rounds · H · K · B · T training tokens:

    central           one process, batch K·B, rounds·H AdamW steps
    dense             K peers, H inner steps, fp32 pseudo-gradients averaged (DiLoCo, plain outer step)
    dense-nesterov    as dense with outer Nesterov momentum (lr 0.7, μ 0.9)
    nord-<d>          Nord's codec (top-k per 4096-chunk at density d, NF4) + error feedback +
                      the sparse-aware mean, through the real envelope bytes and Replica (density 25%,
                      6.25%, 1.56%)
    <d>-divk          as nord-<d> with a dense ÷K mean (weight-dilution ablation; bench-side)
    <d>-noef          as nord-<d> without error feedback (CodecConfig.ef_decay = 0)
    <d>-median        as nord-<d> with each contribution clipped to the round's median norm
                      (MergeConfig.median_norm_clip)
    <d>-damped        as nord-<d> with W += η·S/(C + c0), c0 = 1 (MergeConfig.damping, the default)
    <d>-damped-c2     as <d>-damped with c0 = 2
    wu<R>-<d>         density warm-up (CodecConfig.warmup_rounds = R, warmup_density = 25%): round r < R
                      keeps 25% · (d / 25%)^(r / R), then d; damped mean c0 = 1 (R = 2, 4 or 8 at
                      1.56%, R = 4 at 6.25%; any wu<R>-<d>[-from<w>][-lr<η>][-ef<β>][-2bit][-b<B>][-shared]
                      runs with --setups, d and w in percent rounded to k/4096, η the outer lr, β the
                      residual's decay (CodecConfig.ef_decay), -2bit CodecConfig.value_bits = 2, -b<B>
                      CodecConfig.block = B, e.g. wu16-0.39-from6.25-lr1.5, wu8-0.78-ef0.95,
                      wu8-3.12-from12.5-2bit-b8;
                      -shared: CodecConfig.mask = "shared", a random-k mask all peers derive from the
                      round, so only values travel; wu0-<d> is no warm-up)

Peers run in one process (see bench/_decentralized_sim.py; tables and plots: bench/_decentralized_report.py);
setups run in parallel worker processes
(--jobs), each with one torch thread.

    nord bench decentralized                # reduced CPU default (tiny model, 9 setups; see docs/benchmarks)
    nord bench decentralized --setups all   # every setup above
    nord bench decentralized --quick        # smoke run (seconds)
    nord bench decentralized --scale        # the `small` model on a GPU
    nord bench decentralized --peers 16 --setups central dense nord-6.25
    nord bench decentralized --combine a.json b.json --out c.json   # one table from runs of one shape
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing as mp
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decentralized_report import combined_runs, partial_report, progress_points, report  # noqa: E402
from _decentralized_sim import RunShape, Setup, run_setup  # noqa: E402

from nord.codec import DeltaEncoder, density_for_round  # noqa: E402
from nord.data import DataConfig, default_data_root, prepare  # noqa: E402
from nord.errors import ConfigError  # noqa: E402
from nord.fsutil import atomic_write_bytes  # noqa: E402
from nord.identity import Identity  # noqa: E402
from nord.model import NordLM  # noqa: E402
from nord.recipes import get_config  # noqa: E402

DENSITIES = {"25": 0.25, "6.25": 0.0625, "1.56": 64 / 4096}
WARMUP_DENSITY = 0.25  # round 0's density in the wu<R>-<d> setups
# Run without --setups: the baselines, the three codec densities, the damped mean at --ablation-density
# (1.56 by default), the run default (wu8-1.56) and its neighbours; 4 min 15 s on 2 shared cores
# (docs/benchmarks/decentralized.md). The settled ablations (divk, noef, median, dense-nesterov, damped-c2,
# wu2) run with --setups.
DEFAULT_SETUPS = (
    "central", "dense", "nord-25", "nord-6.25", "nord-1.56", "{ablation}-damped",
    "wu4-1.56", "wu8-1.56", "wu4-6.25",
)  # fmt: skip


def all_setups(ablation: str) -> dict[str, Setup]:
    """Every setup by name; the ablations (divk, noef, median, damped) run at density `ablation`."""
    setups = {
        "central": Setup(name="central", kind="central"),
        "dense": Setup(name="dense", kind="dense"),
        "dense-nesterov": Setup(name="dense-nesterov", kind="dense", outer="nesterov", outer_lr=0.7),
    }
    for label, d in DENSITIES.items():
        setups[f"nord-{label}"] = Setup(name=f"nord-{label}", kind="nord", density=d)
    d = DENSITIES[ablation]
    for suffix, extra in (
        ("divk", {"mean": "divk"}),
        ("noef", {"ef_decay": 0.0}),
        ("median", {"mean": "median"}),
        ("damped", {"mean": "damped", "c0": 1.0}),
        ("damped-c2", {"mean": "damped", "c0": 2.0}),
    ):
        name = f"{ablation}-{suffix}"
        setups[name] = Setup(name=name, kind="nord", density=d, **extra)
    for name in ("wu2-1.56", "wu4-1.56", "wu8-1.56", "wu4-6.25"):
        setups[name] = warmup_setup(name)
    return setups


def warmup_setup(name: str) -> Setup | None:
    """`wu<R>-<d>[-from<w>][-lr<η>][-ef<β>][-2bit][-b<B>][-shared]` (d, w in percent, rounded to k/4096):
    warm-up over R rounds from w (default 25%) to d, damped mean c0 = 1, outer lr η (default 1),
    error-feedback decay β (default 1), NF4 or 2-bit values, top-k over single values or blocks of B,
    or shared masks; None if `name` is not of that form."""
    number = r"(\d+(?:\.\d+)?)"
    match = re.fullmatch(
        rf"wu(\d+)-{number}(?:-from{number})?(?:-lr{number})?(?:-ef{number})?(-2bit)?(?:-b(\d+))?(-shared)?",
        name,
    )
    if match is None:
        return None
    rounds, final, start, outer_lr, ef_decay, two_bit, block, shared = match.groups()
    density = _per_chunk(final)
    warmup_density = _per_chunk(start) if start else WARMUP_DENSITY
    if not 0 < density <= 1 or not 0 < warmup_density <= 1:
        raise ConfigError(f"setup {name!r}: densities must be in (0, 100] percent of a 4096-chunk")
    if ef_decay is not None and not 0 <= float(ef_decay) <= 1:
        raise ConfigError(f"setup {name!r}: the error-feedback decay must be in [0, 1]")
    return Setup(
        name=name, kind="nord", density=density, mean="damped", c0=1.0,
        warmup_rounds=int(rounds), warmup_density=warmup_density, outer_lr=float(outer_lr or 1.0),
        ef_decay=float(ef_decay or 1.0), value_bits=2 if two_bit else 4, block=int(block or 1),
        mask="shared" if shared else "topk",
    )  # fmt: skip


def _per_chunk(percent: str) -> float:
    """A density label in percent as a whole number of values per 4096-chunk (1.56 -> 64/4096)."""
    return round(float(percent) / 100 * 4096) / 4096


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Setups: see the module doc.")
    p.add_argument("--model", default=None, help="recipe (default tiny; small with --scale)")
    p.add_argument("--peers", type=int, default=None, help="K peers (default 4; 2 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="outer rounds (default 24)")
    p.add_argument("--inner-steps", type=int, default=None, help="H inner steps per round (default 5)")
    p.add_argument("--batch-size", type=int, default=None, help="per-peer batch (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="default 64")
    p.add_argument("--lr", type=float, default=3e-3, help="inner AdamW peak lr (cosine schedule)")
    p.add_argument("--eval-every", type=int, default=None, help="rounds between validation points")
    p.add_argument("--eval-windows", type=int, default=None, help="windows per intermediate validation")
    p.add_argument(
        "--setups", nargs="+", default=None,
        help="names to run, or 'all' (default: " + " ".join(DEFAULT_SETUPS).format(ablation="<d>") + ")",
    )  # fmt: skip
    p.add_argument("--ablation-density", choices=sorted(DENSITIES), default="1.56")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds for --seeded setups")
    p.add_argument(
        "--seeded", nargs="*", default=["central", "dense", "nord-6.25"],
        help="setups run with every --seeds value (the others with the first seed only)",
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=4, help="setups trained in parallel processes")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 peers, 2 rounds")
    p.add_argument(
        "--bytes-only", action="store_true",
        help="no training: envelope bytes per round of the Nord setups over --rounds (random deltas)",
    )  # fmt: skip
    p.add_argument("--scale", action="store_true", help="GPU run: small model, B 16, T 256, 60 rounds, H 20")
    p.add_argument("--device", default=None, help="default cuda with --scale, else cpu")
    p.add_argument("--out", default="bench/results/decentralized.json", help="JSON output")
    p.add_argument("--plots", default=None, help="PNG prefix (default: the --out path without .json)")
    p.add_argument("--progress", default=None, help="JSONL: every run appends each validation point")
    p.add_argument(
        "--partial", nargs="+", default=None, metavar="FILE",
        help="no training: the gap-vs-rounds table of runs that may not have finished, from --progress "
        "JSONL files or this bench's logs",
    )  # fmt: skip
    p.add_argument(
        "--combine", nargs="+", default=None, metavar="JSON",
        help="no training: one table, gap curve and plots from the runs of earlier --out files (same shape)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.quick and args.scale:
        raise ConfigError("--quick and --scale exclude each other")
    for name in ("peers", "rounds", "inner_steps", "batch_size", "seq_len", "eval_every", "jobs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def run_shape(args: argparse.Namespace, corpus_dir: str) -> RunShape:
    if args.quick:
        preset = {"model": "tiny", "peers": 2, "rounds": 2, "inner_steps": 2, "batch_size": 2,
                  "seq_len": 16, "eval_every": 1, "eval_windows": 2, "final_windows": 4,
                  "warmup": 2}  # fmt: skip
    elif args.scale:
        preset = {"model": "small", "peers": 4, "rounds": 60, "inner_steps": 20, "batch_size": 16,
                  "seq_len": 256, "eval_every": 5, "eval_windows": 20, "warmup": 50}  # fmt: skip
    else:
        preset = {"model": "tiny", "peers": 4, "rounds": 24, "inner_steps": 5, "batch_size": 4,
                  "seq_len": 64, "eval_every": 3, "eval_windows": 12, "warmup": 20}  # fmt: skip
    for key in (
        "model",
        "peers",
        "rounds",
        "inner_steps",
        "batch_size",
        "seq_len",
        "eval_every",
        "eval_windows",
    ):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    device = args.device or ("cuda" if args.scale else "cpu")
    return RunShape(corpus_dir=corpus_dir, lr=args.lr, device=device, progress=args.progress, **preset)


def _task(item: tuple[Setup, int, RunShape]) -> dict:
    torch.set_num_threads(1)  # one thread per process: on a busy machine more threads only spin
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    setup, seed, shape = item
    return run_setup(setup, seed, shape)


def _run_all(tasks: list, jobs: int):
    """Results as they finish: in this process for --jobs 1, else in a pool of spawned processes."""
    if jobs == 1:
        yield from map(_task, tasks)
        return
    with mp.get_context("spawn").Pool(min(jobs, len(tasks))) as pool:
        yield from pool.imap_unordered(_task, tasks)


def model_spec(model: str, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The trainable tensors of recipe `model` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return NordLM(dataclasses.replace(get_config(model), vocab_size=vocab_size)).param_spec()


def model_params(model: str, vocab_size: int) -> int:
    return sum(math.prod(shape) for shape in model_spec(model, vocab_size).values())


def bytes_plan(setups: list[Setup], rounds: int, model: str, vocab_size: int) -> list[dict]:
    """Envelope bytes per peer per round of each Nord setup over `rounds`, without training: each round's
    density (warm-up schedule included) is measured once on a seeded random delta of the model's shape.
    The sizes of a training run's envelopes differ a little (docs/benchmarks/decentralized.md compares)."""
    spec = model_spec(model, vocab_size)
    params = model_params(model, vocab_size)
    g = torch.Generator().manual_seed(0)
    delta = {name: torch.randn(*shape, generator=g) for name, shape in spec.items()}
    identity, sizes, rows = Identity.from_private_bytes(bytes(32)), {}, []
    for setup in (s for s in setups if s.kind == "nord"):
        codec = setup.codec()
        per_round = []
        for rnd in range(rounds):
            density = density_for_round(codec, rnd)
            key = (density, setup.mask, setup.value_bits, setup.block)
            if key not in sizes:
                encoder = DeltaEncoder(dataclasses.replace(codec, density=density, warmup_rounds=0), spec)
                sizes[key] = encoder.encode(
                    delta, run_id="plan", round=0, base_hash="0" * 64, identity=identity
                ).nbytes
            per_round.append(sizes[key])
        mean = statistics.fmean(per_round)
        rows.append({"setup": setup.name, "rounds": rounds, "bytes_per_peer_round": mean,
                     "byte_ratio_vs_dense": 4 * params / mean, "first_rounds": per_round[:3]})  # fmt: skip
        print(f"{setup.name:<28} {mean:>10,.0f} B/peer/round over {rounds} rounds: "
              f"{4 * params / mean:6.1f}x fewer than dense fp32", flush=True)  # fmt: skip
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(["nord bench decentralized", *(argv if argv is not None else sys.argv[1:])])
    if args.combine:
        shape, results = combined_runs(args.combine)
        names = list(dict.fromkeys(r["setup"]["name"] for r in results))
        report(results, names, Path(args.out), args.plots, {"command": command, "shape": shape})
        return 0
    setups = all_setups(args.ablation_density)
    default = [name.format(ablation=args.ablation_density) for name in DEFAULT_SETUPS]
    names = list(setups) if args.setups == ["all"] else (args.setups or default)
    for name in names:
        if name not in setups and (parsed := warmup_setup(name)) is not None:
            setups[name] = parsed
    unknown = [n for n in names if n not in setups]
    if unknown:
        raise ConfigError(f"unknown setup {unknown[0]!r}; choose from: {', '.join(setups)}")
    corpus = prepare(DataConfig(), default_data_root(), progress=False)
    shape = run_shape(args, str(corpus.path))
    if args.partial:
        dense_bytes = 4.0 * model_params(shape.model, corpus.vocab_size)
        partial_report(progress_points(args.partial), dense_bytes, Path(args.out), args.plots)
        return 0
    if args.bytes_only:
        rows = bytes_plan([setups[n] for n in names], shape.rounds, shape.model, corpus.vocab_size)
        doc = {"command": command, "bytes_only": True, "model": shape.model, "rows": rows}
        atomic_write_bytes(Path(args.out), json.dumps(doc, indent=1).encode())
        return 0
    tasks = [
        (setups[n], seed, shape)
        for n in names
        for seed in (args.seeds if n in args.seeded else args.seeds[:1])
    ]
    print(f"{len(tasks)} runs, shape: {dataclasses.asdict(shape)}", flush=True)
    start = time.perf_counter()
    results = []
    for r in tqdm(_run_all(tasks, args.jobs), total=len(tasks), desc="setups"):
        r["peers"] = shape.peers
        results.append(r)
        print(f"  {r['setup']['name']} seed {r['seed']}: val {r['val']['loss']:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)  # fmt: skip
    extra = {
        "command": command,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "jobs": args.jobs},
        "shape": dataclasses.asdict(shape),
        "wall_seconds": time.perf_counter() - start,
    }
    report(results, names, Path(args.out), args.plots, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
