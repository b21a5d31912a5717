"""Soak: a real coordinator (`nord-coordinator serve`) and workers (`nord-node join`) on 127.0.0.1 for
many short rounds while workers join and leave on a seeded schedule; is anything in the coordinator
growing with the run's length?

Sampled every --sample-s from /proc/<pid> of the coordinator (and of its p2pd): RSS, open fds, threads;
the size of its state dir (replica, checkpoints, history apart); the time `/api/summary` takes. Per sealed
round, from the coordinator's history once stopped: the seal latency (sealed_at minus the arrival of the
last contribution it folds) and the round's period. "Flat" = the last quarter's median within ±10% of the
first quarter's after the warm-up.

    python bench/soak.py --rounds 500 --seed 0

Writes bench/results/soak.json and docs/reliability_soak.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the swarm and process helpers shared with the chaos tests

from procs import p2pd_children  # noqa: E402
from swarm import Swarm  # noqa: E402

from coordinator.history import History  # noqa: E402

METRICS = {  # sample key -> (label, unit)
    "rss_mib": ("coordinator RSS", "MiB"),
    "fds": ("coordinator open fds", ""),
    "threads": ("coordinator threads", ""),
    "p2pd_rss_mib": ("its p2pd RSS", "MiB"),
    "state_mib": ("state dir", "MiB"),
    "state_no_history_mib": ("state dir without history.sqlite", "MiB"),
    "api_ms": ("GET /api/summary", "ms"),
}


def proc_status(pid: int) -> dict[str, float]:
    """RSS (MiB), threads and open fds of a live process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def dir_bytes(path: Path, skip: str = "") -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            if skip and f.startswith(skip):
                continue
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:  # removed while we walk (compaction, checkpoint pruning)
                pass
    return total


class Churn:
    """Workers joining and leaving on a seeded schedule: at most `most` running, at least one; a join
    is a returning worker (its own state dir) or, one time in three, a new one."""

    def __init__(self, swarm: Swarm, rng: random.Random, most: int, every: tuple[int, int]) -> None:
        self.swarm, self.rng, self.most, self.every = swarm, rng, most, every
        self.names: list[str] = []
        self.leaving: list[str] = []
        self.events: list[dict] = []
        self.next_at = 0

    def running(self) -> list[str]:
        return [n for n in self.names if self.swarm.running[n].poll() is None and n not in self.leaving]

    def join(self, name: str | None = None) -> None:
        stopped = [n for n in self.names if n not in self.running() and n not in self.leaving]
        if name is None:
            name = (
                self.rng.choice(stopped) if stopped and self.rng.random() > 1 / 3 else f"w{len(self.names)}"
            )
        if name not in self.names:
            self.names.append(name)
        self.swarm.join(name)
        self.events.append({"t": time.time(), "event": "join", "worker": name})

    def leave(self) -> None:
        name = self.rng.choice(self.running())
        self.swarm.running[name].terminate()  # a clean leave: the worker finishes what it is doing
        self.leaving.append(name)
        self.events.append({"t": time.time(), "event": "leave", "worker": name})

    def step(self, sealed: int) -> None:
        for name in list(self.leaving):
            if self.swarm.running[name].poll() is not None:
                self.leaving.remove(name)
        if sealed < self.next_at:
            return
        self.next_at = sealed + self.rng.randint(*self.every)
        running = len(self.running())
        if running <= 1 or (running < self.most and self.rng.random() < 0.5):
            self.join()
        else:
            self.leave()


def sample(swarm: Swarm) -> dict[str, float]:
    coord = swarm.running["coord"].pid
    t0 = time.perf_counter()
    summary = swarm.get("/api/summary")
    row = {
        "t": time.time(),
        "sealed": int(summary["sealed_rounds"]),
        "api_ms": 1000 * (time.perf_counter() - t0),
        "load1": os.getloadavg()[0],  # times above are only comparable at a similar load
    }
    row.update(proc_status(coord))
    daemons = sorted(p2pd_children(coord))
    if daemons:
        row["p2pd_rss_mib"] = proc_status(daemons[0])["rss_mib"]
    state = swarm.tmp / "coord"
    row["state_mib"] = dir_bytes(state) / 2**20
    row["state_no_history_mib"] = dir_bytes(state, skip="history.sqlite") / 2**20
    return row


def seal_latencies(state_dir: Path) -> list[dict]:
    """Per sealed round: when it was sealed, after the last contribution it folds arrived."""
    history = History.open(state_dir / "history.sqlite")
    try:
        rounds = [r for r in history.rounds() if r["sealed_at"]]
        last_arrival: dict[int, float] = {}
        for c in history.contributions():
            if c["sealed_in"] is not None:
                last_arrival[c["sealed_in"]] = max(last_arrival.get(c["sealed_in"], 0.0), c["received_at"])
    finally:
        history.close()
    out, previous = [], None
    for r in rounds:
        arrived = last_arrival.get(r["round"])
        out.append({
            "round": r["round"], "sealed_at": r["sealed_at"],
            "seal_latency_s": r["sealed_at"] - arrived if arrived else None,
            "period_s": r["sealed_at"] - previous if previous else None,
        })  # fmt: skip
        previous = r["sealed_at"]
    return out


def drift(points: list[tuple[int, float]], warmup: int) -> dict[str, float] | None:
    """Median of the first and the last quarter of the rounds after `warmup`, and the change between them."""
    after = [(r, v) for r, v in points if r >= warmup and v is not None]
    if len(after) < 8:
        return None
    lo, hi = after[0][0], after[-1][0]
    span = (hi - lo) / 4
    first = [v for r, v in after if r <= lo + span]
    last = [v for r, v in after if r >= hi - span]
    a, b = statistics.median(first), statistics.median(last)
    return {
        "first_quarter": a,
        "last_quarter": b,
        "change": (b - a) / a if a else 0.0,
        "max": max(v for _, v in after),
    }


def load_span(samples: list[dict], before: tuple[float, ...], after: tuple[float, ...]) -> str:
    """The 1-minute load average over the run, for the plot's title (it inflates every time shown)."""
    loads = [s["load1"] for s in samples if "load1" in s] or [before[0], after[0]]
    return f"load avg {min(loads):.0f}–{max(loads):.0f} on {os.cpu_count()} cores"


def plot(samples: list[dict], rounds: list[dict], warmup: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["rss_mib", "fds", "threads", "state_mib", "api_ms"]
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), sharex=True)
    for ax, key in zip(axes.flat, keys, strict=False):
        label, unit = METRICS[key]
        ax.plot([s["sealed"] for s in samples], [s.get(key) for s in samples], lw=0.8, label=label)
        if key == "state_mib":
            label2 = METRICS["state_no_history_mib"][0]
            ax.plot(
                [s["sealed"] for s in samples],
                [s["state_no_history_mib"] for s in samples],
                lw=0.8,
                label=label2,
            )
            ax.legend(fontsize=7)
        ax.set_title(f"{label}" + (f" ({unit})" if unit else ""), fontsize=9)
        ax.axvline(warmup, color="grey", ls=":", lw=0.8)
        ax.set_ylim(bottom=0)
    ax = axes.flat[5]
    ax.scatter([r["round"] for r in rounds], [r["seal_latency_s"] for r in rounds], s=3)
    ax.set_title("seal latency (s): last folded contribution → sealed", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.axvline(warmup, color="grey", ls=":", lw=0.8)
    for ax in axes[-1]:
        ax.set_xlabel("sealed rounds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def run_soak(args: argparse.Namespace, tmp: Path) -> dict:
    rng = random.Random(args.seed)
    samples: list[dict] = []
    with Swarm(tmp, run="soak") as swarm:
        swarm.init(
            quorum=args.quorum, inner_steps=args.inner_steps, batch_size=args.batch_size, seq_len=args.seq_len
        )
        swarm.start_coordinator()
        churn = Churn(swarm, rng, args.max_workers, (args.churn_min, args.churn_max))
        churn.join("w0")
        started = time.time()
        with tqdm(total=args.rounds, desc="sealed rounds", unit="round") as bar:
            while True:
                assert swarm.running["coord"].poll() is None, swarm.log("coord")
                row = sample(swarm)
                samples.append(row)
                bar.update(row["sealed"] - bar.n)
                bar.set_postfix(
                    rss=f"{row['rss_mib']:.0f}M", fds=row["fds"], thr=row["threads"], w=len(churn.running())
                )
                if row["sealed"] >= args.rounds or time.time() - started > args.max_minutes * 60:
                    break
                churn.step(row["sealed"])
                time.sleep(args.sample_s)
        swarm.stop()
        swarm.assert_daemons_gone()
    return {
        "samples": samples,
        "events": churn.events,
        "workers": churn.names,
        "wall_s": time.time() - started,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=500, help="stop after this many sealed rounds")
    p.add_argument("--max-minutes", type=float, default=600, help="... or after this long (a partial soak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-workers", type=int, default=3)
    p.add_argument("--churn-min", type=int, default=8, help="sealed rounds between joins/leaves, at least")
    p.add_argument("--churn-max", type=int, default=25)
    p.add_argument("--quorum", type=int, default=1)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--sample-s", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.1, help="share of the rounds left out of the drift")
    p.add_argument("--tmp", type=Path, help="state and logs here (default: a temporary dir, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "reliability_soak.png")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    if args.tmp:
        args.tmp.mkdir(parents=True, exist_ok=True)
        result = run_soak(args, args.tmp)
        rounds = seal_latencies(args.tmp / "coord")
    else:
        with tempfile.TemporaryDirectory(prefix="nord-soak-") as tmp:
            result = run_soak(args, Path(tmp))
            rounds = seal_latencies(Path(tmp) / "coord")
    samples = result["samples"]
    sealed = samples[-1]["sealed"]
    warmup = max(10, int(args.warmup * sealed))
    table = {key: drift([(s["sealed"], s.get(key)) for s in samples], warmup) for key in METRICS}
    table["seal_latency_s"] = drift([(r["round"], r["seal_latency_s"]) for r in rounds], warmup)
    table["period_s"] = drift([(r["round"], r["period_s"]) for r in rounds], warmup)

    churned = f"{len(result['events'])} joins/leaves, {len(result['workers'])} distinct workers"
    minutes = result["wall_s"] / 60
    print(f"\n{sealed} sealed rounds in {minutes:.1f} min, {churned}; drift after round {warmup}:")
    print(f"{'metric':<36}{'first quarter':>15}{'last quarter':>15}{'change':>9}{'max':>10}")
    labels = {**METRICS, "seal_latency_s": ("seal latency", "s"), "period_s": ("round period", "s")}
    for key, d in table.items():
        if d:
            name = " ".join(labels[key]).strip()
            print(f"{name:<36}{d['first_quarter']:>15.3f}{d['last_quarter']:>15.3f}", end="")
            print(f"{d['change']:>+9.1%}{d['max']:>10.3f}")

    load_after = os.getloadavg()
    report = {
        "command": "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sealed_rounds": sealed, "wall_s": result["wall_s"], "warmup_rounds": warmup, "drift": table,
        "events": result["events"], "rounds": rounds, "samples": samples,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    load = load_span(samples, load_before, load_after)
    title = (
        f"nord soak: {sealed} sealed rounds, tiny model, quorum {args.quorum}, H={args.inner_steps}, "
        f"{len(result['events'])} joins/leaves (seed {args.seed}); {load}"
    )
    plot(samples, rounds, warmup, args.plot, title)
    print(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
