"""One training step of a Nord recipe on the CPU: tokens/s, peak memory, and where the time goes.

    step      forward + backward + gradient clipping + AdamW (`nord.train.make_optimizer`) on random tokens,
              --batch-size × --seq-len (the worker's defaults, 8 × 256), fp32, --threads CPU threads
    variants  each in a fresh process, taking turns for --rounds rounds so they share the machine's load:
                nord       this working tree
                nord@REV   the same recipe at commit REV (--baseline, default b8aea4c, before issue #22),
                           checked out into a temporary `git worktree` that is removed afterwards
                gpt        the GPT of equal parameter count from bench/quality.py (the reference)
              with --extras, options for `nord` (nord+eager: what training did before the kernel; the others
              are what-ifs, not what training does by default):
                nord+eager       NORD_NEURON_KERNEL=eager: the neuron in eager ops, not the C++ kernel
                nord+keep-freed  glibc keeps freed memory (mallopt M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD
                                 2 GiB) instead of unmapping it: no page faults on each step's activations
                nord+bf16        bf16 autocast on the CPU (AMX where the CPU has it), as
                                 `train_steps(cpu_bf16=True)`; changes the numerics (see --quality)
              per variant: median CPU seconds per step over --steps steps a round (after one warm-up step),
              tokens/s = tokens per step / that, and peak RSS (whole process, and above the RSS once the
              model and optimizer are built)
    profile   one step of each Nord variant under torch.profiler, its self CPU time split by part of the
              model; backward ops count to the part whose forward op made them (autograd sequence numbers)

    quality   with --quality STEPS instead: `small` trained STEPS steps on Shakespeare in fp32 and under CPU
              bf16 autocast (`train_steps(cpu_bf16=True)`), seeds 0 and 1 (init and batch order), the four
              runs in parallel processes, then the validation loss of each in fp32 (bench/quality.py's
              windows): bf16 − fp32 at one seed against seed 1 − seed 0 in one precision (the noise)

    python bench/model_step.py [--model small] [--threads 1] [--rounds 3] [--steps 3] [--baseline b8aea4c]
    python bench/model_step.py --quality 120 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from _revision import older_tree  # noqa: E402

PARTS = (  # profile rows: label -> what it covers
    ("neuron: gates + scan", "the mixer neuron's decay gates, convolution and linear scan, fwd + bwd"),
    ("spikes (surrogate)", "every Heaviside spike and its surrogate gradient (mixer, memory gate, MLP)"),
    ("mixer projections", "W_u, W_g, W_o, the σ gate and the rest of the mixer"),
    ("memory slots", "memory keys, gate threshold and values"),
    ("MLP", "W_1, threshold and W_2"),
    ("norms", "the RMSNorms"),
    ("embedding", "token embedding lookup"),
    ("head + loss", "final norm's output to logits (tied head) and cross-entropy"),
    ("block residual + counters", "residual adds, spike and write counters, firing-rate regulariser"),
    ("clip + optimizer", "gradient clipping and AdamW"),
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(variant: str, model_name: str, seq_len: int):
    """The model and its AdamW, from whichever `nord` is first on sys.path."""
    import torch

    from nord.config import TrainConfig
    from nord.model import NordLM
    from nord.recipes import get_config
    from nord.train import make_optimizer

    cfg = get_config(model_name)
    torch.manual_seed(0)
    model = NordLM(cfg)
    if variant == "gpt":
        sys.path.insert(0, str(REPO / "bench"))
        from quality import matched_gpt

        torch.manual_seed(0)
        model = matched_gpt(cfg, model.num_params(), seq_len)
    return model, make_optimizer(model, TrainConfig(), "cpu"), cfg.vocab_size


def training_step(model, optimizer, x, bf16: bool = False) -> None:
    import torch
    from torch.profiler import record_function

    with record_function("forward"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x, x)
        objective = out.loss + out.reg_loss
    with record_function("backward"):
        objective.backward()
    with record_function("clip + optimizer"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def label_parts(model) -> None:
    """Wrap the model's parts in profiler regions named after PARTS (instance attributes, this process only).
    Code before issue #22 computes the memory read inline in `Block.forward`: there it counts as residual."""
    from torch.profiler import record_function

    def wrap(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def labelled(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)

        setattr(obj, name, labelled)

    wrap(model.embed, "forward", "embedding")
    wrap(model, "_logits", "head + loss")
    for block in model.blocks:
        parts = {"mix": "mixer projections", "read_memory": "memory slots", "mlp": "MLP"}
        parts |= {f"{name}.forward": "mixer projections" for name in ("mix_in", "mix_gate", "mix_out")}
        parts |= {f"{name}.forward": "MLP" for name in ("mlp_in", "mlp_out")}
        parts |= {"norm1.forward": "norms", "norm2.forward": "norms"}
        for path, label in parts.items():
            *owner, name = path.split(".")
            obj = getattr(block, owner[0]) if owner else block
            if hasattr(obj, name):
                wrap(obj, name, label)


def split_profile(prof) -> dict[str, float]:
    """Self CPU ms per part: an op belongs to its innermost labelled region or custom autograd function;
    a backward op to the part of the forward op with its sequence number."""
    # the kernel's function also fires the mixer's spikes: with it those count to the neuron's row
    custom = {"_DynamicDecay": PARTS[0][0], "_ChunkScan": PARTS[0][0], "_DecayGates": PARTS[0][0],
              "_KernelNeuron": PARTS[0][0],
              "_Spike": PARTS[1][0], "_IntegerSpike": PARTS[1][0]}  # fmt: skip
    labels = {name for name, _ in PARTS}
    events = list(prof.events())

    def region(event) -> str | None:
        while event is not None:
            name = event.name.removesuffix("Backward")
            if name in custom:
                return custom[name]
            if event.name in labels:
                return event.name
            event = event.cpu_parent
        return None

    forward_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            forward_part.setdefault(e.sequence_nr, region(e))
    totals: dict[str, float] = {}
    for e in events:
        part, node = region(e), e
        while part is None and node is not None:  # backward: the part of the op that made this node
            if node.name.startswith("autograd::engine::evaluate_function"):
                part = forward_part.get(node.sequence_nr)
                break
            node = node.cpu_parent
        if part is None:
            part = "head + loss" if e.name.startswith("aten::nll_loss") or "log_softmax" in e.name else None
        part = part or "block residual + counters"
        totals[part] = totals.get(part, 0.0) + e.self_cpu_time_total / 1e3
    return totals


def worker(args) -> None:
    """Measure one variant in this process and print one JSON line."""
    variant, _, option = args.worker.partition("+")
    if option == "eager":
        os.environ["NORD_NEURON_KERNEL"] = "eager"
    if option == "keep-freed":  # before torch allocates anything
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 2**30)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    if args.tree:
        sys.path.insert(0, args.tree)
    import torch

    import nord

    torch.set_num_threads(args.threads)
    model, optimizer, vocab = build(variant, args.model, args.seq_len)
    bf16 = option == "bf16"
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    rss_built = rss_bytes()
    training_step(model, optimizer, x, bf16)  # warm-up: the optimizer's moments exist from here on
    cpu, wall = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        training_step(model, optimizer, x, bf16)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"cpu_s": cpu, "wall_s": wall, "peak_rss": peak, "peak_above_built": peak - rss_built,
              "tokens_per_step": x.numel(), "nord": str(Path(nord.__file__).parent)}  # fmt: skip
    if args.profile and args.worker == "nord":  # this tree or the baseline, as training runs them
        from torch.profiler import ProfilerActivity, profile

        label_parts(model)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            training_step(model, optimizer, x)
        result["profile_ms"] = split_profile(prof)
    print(json.dumps(result))


def quality_run(args, seed: int, precision: str) -> dict:
    """Train `small` --quality steps at `seed` in fp32 or bf16 autocast; its validation loss in fp32."""
    import dataclasses

    import torch
    from quality import window_eval

    from nord.config import TrainConfig
    from nord.data import DataConfig, prepare
    from nord.model import NordLM
    from nord.recipes import get_config
    from nord.train import cosine_lr, make_optimizer, train_steps

    torch.set_num_threads(args.threads)
    corpus = prepare(DataConfig(source="shakespeare"), progress=False)
    cfg = dataclasses.replace(get_config(args.model, vocab_size=corpus.vocab_size), max_seq_len=args.seq_len)
    torch.manual_seed(seed)
    model = NordLM(cfg)
    train_cfg = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, lr=3e-3)
    optimizer = make_optimizer(model, train_cfg, "cpu")
    steps = args.quality
    lr_fn = cosine_lr(train_cfg.lr, warmup_steps=max(1, min(50, steps // 10)), total_steps=steps)
    batches = iter(corpus.batches("train", args.batch_size, args.seq_len, seed=seed))
    start = time.process_time()
    stats = train_steps(model, optimizer, batches, steps, grad_clip=train_cfg.grad_clip, lr_fn=lr_fn,
                        device="cpu", progress=False, cpu_bf16=precision == "bf16")  # fmt: skip
    cpu_s = time.process_time() - start
    val = window_eval(model, corpus, args.seq_len, args.batch_size, args.eval_batches)
    return {"seed": seed, "precision": precision, "train_loss": stats.loss, "val_loss": val["loss"],
            "firing_rate": val["firing_rate"], "cpu_s": cpu_s,
            "tokens_per_cpu_s": stats.tokens / cpu_s}  # fmt: skip


def quality(args) -> None:
    """fp32 and bf16 at seeds 0 and 1, each in its own process, all at once; prints and saves the table."""
    import torch

    runs = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16")]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--quality", str(args.quality),
           "--model", args.model, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--eval-batches", str(args.eval_batches)]  # fmt: skip
    procs = [subprocess.Popen([*cmd, "--worker", f"quality:{seed}:{precision}"], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for seed, precision in runs]  # fmt: skip
    rows = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a quality run failed (exit {proc.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    steps = args.quality
    print(f"{args.model}, {steps} steps × {args.batch_size}×{args.seq_len} tokens, lr 3e-3 cosine, "
          f"{args.threads} thread(s) per run; validation: {args.eval_batches} batches of windows, "
          "fp32")  # fmt: skip
    print(f"{'seed':>4} {'precision':9} {'train loss':>10} {'val loss':>8} {'firing':>6} {'tok/CPU s':>9}")
    for r in rows:
        print(f"{r['seed']:>4} {r['precision']:9} {r['train_loss']:10.4f} {r['val_loss']:8.4f} "
              f"{r['firing_rate']:6.3f} {r['tokens_per_cpu_s']:9.0f}")  # fmt: skip
    val = {(r["seed"], r["precision"]): r["val_loss"] for r in rows}
    summary = {"bf16_minus_fp32": [val[s, "bf16"] - val[s, "fp32"] for s in (0, 1)],
               "seed1_minus_seed0": [val[1, p] - val[0, p] for p in ("fp32", "bf16")]}  # fmt: skip
    for label, key in (("bf16 − fp32 at seeds 0, 1", "bf16_minus_fp32"),
                       ("seed 1 − seed 0 in fp32, bf16", "seed1_minus_seed0")):  # fmt: skip
        print(f"val loss, {label}: " + ", ".join(f"{d:+.4f}" for d in summary[key]))
    meta = {"model": args.model, "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "threads": args.threads, "eval_batches": args.eval_batches, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_at_end": os.getloadavg()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


def run_variant(variant: str, tree: str | None, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", args.model,
           "--threads", str(args.threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len)] + (["--tree", tree] if tree else []) + (
           ["--profile"] if args.profile else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tree or REPO)
    if out.returncode:
        raise SystemExit(f"{variant} ({tree or REPO}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = Path(tree or REPO) / "nord"
    if Path(result["nord"]) != expected:
        raise SystemExit(f"{variant} imported nord from {result['nord']}, not {expected}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all variants, taking turns")
    parser.add_argument("--baseline", default="b8aea4c", help="commit measured as nord@REV ('' to skip)")
    parser.add_argument("--no-gpt", action="store_true", help="skip the GPT reference")
    parser.add_argument("--extras", action="store_true", help="also nord+eager, +keep-freed and +bf16")
    parser.add_argument("--profile", action="store_true", help="also split one step's time by model part")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_step.json"))
    parser.add_argument("--quality", type=int, default=0, help="STEPS: fp32 vs bf16 validation loss instead")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches of --quality")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker and args.worker.startswith("quality:"):
        _, seed, precision = args.worker.split(":")
        print(json.dumps(quality_run(args, int(seed), precision)))
        return 0
    if args.worker:
        worker(args)
        return 0
    if args.quality:
        quality(args)
        return 0
    from tqdm import tqdm

    with older_tree(args.baseline) as baseline_tree:
        variants: dict[str, str | None] = {"nord": None}
        if baseline_tree is not None:
            variants[f"nord@{args.baseline}"] = str(baseline_tree)
        if not args.no_gpt:
            variants["gpt"] = None
        if args.extras:
            variants |= {"nord+eager": None, "nord+keep-freed": None, "nord+bf16": None}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for name, tree in variants.items():
                runs[name].append(run_variant(name if tree is None else "nord", tree, args))

    rows = {}
    for name, results in runs.items():
        cpu = statistics.median(s for r in results for s in r["cpu_s"])
        wall = statistics.median(s for r in results for s in r["wall_s"])
        tokens = results[0]["tokens_per_step"]
        rows[name] = {"cpu_s_per_step": cpu, "wall_s_per_step": wall, "tokens_per_cpu_s": tokens / cpu,
                      "tokens_per_wall_s": tokens / wall,
                      "peak_rss_mib": max(r["peak_rss"] for r in results) / 2**20,
                      "peak_above_built_mib": max(r["peak_above_built"] for r in results) / 2**20,
                      }  # fmt: skip
        profiles = [r["profile_ms"] for r in results if "profile_ms" in r]
        if profiles:
            by_part = {p: statistics.median(d.get(p, 0.0) for d in profiles) for p, _ in PARTS}
            rows[name]["profile_ms"] = by_part

    base = rows.get(f"nord@{args.baseline}")
    print(f"{args.model}, {args.batch_size}×{args.seq_len} tokens per step, {args.threads} thread(s); "
          f"medians of {args.rounds}×{args.steps} steps")  # fmt: skip
    print(f"{'variant':16} {'CPU s/step':>10} {'tok/CPU s':>9} {'vs base':>7} {'wall s':>7} "
          f"{'peak RSS MiB':>12} {'above built':>11}")  # fmt: skip
    for name, r in rows.items():
        ratio = f"{r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:7.2f}" if base else f"{'-':>7}"
        print(f"{name:16} {r['cpu_s_per_step']:10.3f} {r['tokens_per_cpu_s']:9.0f} {ratio} "
              f"{r['wall_s_per_step']:7.3f} {r['peak_rss_mib']:12.0f} "
              f"{r['peak_above_built_mib']:11.0f}")  # fmt: skip
    if args.profile:
        names = [n for n in rows if "profile_ms" in rows[n]]
        print("\nself CPU ms of one profiled step, by part" + "".join(f" | {n:>14}" for n in names))
        for part, _ in PARTS:
            print(f"{part:41}" + "".join(f" | {rows[n]['profile_ms'][part]:14.1f}" for n in names))
        print(f"{'total':41}" + "".join(f" | {sum(rows[n]['profile_ms'].values()):14.1f}" for n in names))
    meta = {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "baseline": args.baseline,
            "machine": platform.processor() or platform.machine(), "loadavg_at_end": os.getloadavg(),
            "parts": dict(PARTS)}  # fmt: skip
    import torch

    meta["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
