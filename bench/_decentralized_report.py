"""Tables, the gap-vs-rounds curve, plots and JSON of `nord bench decentralized` (bench/decentralized.py)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from nord.errors import ConfigError
from nord.fsutil import atomic_write_bytes


def summarize(results: list[dict], baseline: str = "dense", central: str = "central") -> list[dict]:
    """One row per setup: mean (and spread over seeds) of the final validation, ratios to baselines."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["setup"]["name"], []).append(r)
    means = {n: statistics.fmean(r["val"]["loss"] for r in rs) for n, rs in by_name.items()}
    base_bytes = 4.0 * results[0]["params"]  # (b) sends every parameter as fp32 each round
    rows = []
    for name, rs in by_name.items():
        losses = [r["val"]["loss"] for r in rs]
        first = rs[0]
        row = {
            "setup": name,
            "seeds": len(rs),
            "val_loss": means[name],
            "val_loss_spread": (max(losses) - min(losses)) if len(rs) > 1 else None,
            "ppl": math.exp(means[name]),
            "bpb": statistics.fmean(r["val"]["bpb"] for r in rs),
            "firing_rate": statistics.fmean(r["firing_rate"] for r in rs),
            "bytes_per_peer_round": first["bytes_per_peer_round"],
            "bytes_per_peer_total": first["bytes_per_peer_total"],
            "bytes_total": first["bytes_per_peer_total"] * (1 if name == central else first["peers"]),
            "bytes_per_param_round": first["bytes_per_param_round"],
            "byte_ratio_vs_dense": (base_bytes / first["bytes_per_peer_round"])
            if first["bytes_per_peer_round"]
            else None,
            "loss_vs_dense": means[name] / means[baseline] - 1 if baseline in means else None,
            "loss_vs_central": means[name] / means[central] - 1 if central in means else None,
            "seconds": statistics.fmean(r["seconds"] for r in rs),
            "bench_side": first["bench_side"],
            "verified_rounds": first["verified_rounds"],
        }
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'setup':<16}{'seeds':>5}{'val loss':>10}{'±':>7}{'ppl':>9}{'bpb':>7}{'fire':>7}"
            f"{'B/peer/rnd':>12}{'×fewer':>8}{'vs dense':>9}{'vs cent':>9}{'s':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['val_loss_spread']:.3f}" if r["val_loss_spread"] is not None else "-"
        ratio = f"{r['byte_ratio_vs_dense']:.1f}" if r["byte_ratio_vs_dense"] else "-"
        vs_d = f"{100 * r['loss_vs_dense']:+.1f}%" if r["loss_vs_dense"] is not None else "-"
        vs_c = f"{100 * r['loss_vs_central']:+.1f}%" if r["loss_vs_central"] is not None else "-"
        name = r["setup"] + ("*" if r["bench_side"] else "")
        print(
            f"{name:<16}{r['seeds']:>5}{r['val_loss']:>10.4f}{spread:>7}{r['ppl']:>9.1f}{r['bpb']:>7.3f}"
            f"{r['firing_rate']:>7.3f}{r['bytes_per_peer_round']:>12,.0f}{ratio:>8}{vs_d:>9}{vs_c:>9}"
            f"{r['seconds']:>7.0f}"
        )
    print("* bench-side merge (no library switch yet)")


def gap_curve(results: list[dict], baseline: str = "dense") -> dict:
    """Validation loss (subset, mean over seeds) at every evaluated round, and its gap to `baseline`."""
    losses: dict[str, list[list[float]]] = {}
    for r in results:
        losses.setdefault(r["setup"]["name"], []).append(r["curve"]["val_loss"])
    mean = {name: [statistics.fmean(v) for v in zip(*curves, strict=True)] for name, curves in losses.items()}
    curve = {"round": results[0]["curve"]["round"], "val_loss": mean, "vs_dense": {}}
    if baseline in mean:
        base = mean[baseline]
        curve["vs_dense"] = {n: [a / b - 1 for a, b in zip(v, base, strict=True)] for n, v in mean.items()}
    return curve


def print_gap_curve(curve: dict) -> None:
    names = list(curve["val_loss"])
    print("round " + "".join(f"{n:>22}" for n in names))
    for i, rnd in enumerate(curve["round"]):
        cells = []
        for n in names:
            gap = curve["vs_dense"].get(n)
            cells.append(f"{curve['val_loss'][n][i]:.3f}" + (f" ({100 * gap[i]:+.1f}%)" if gap else ""))
        print(f"{rnd:>5} " + "".join(f"{c:>22}" for c in cells))


def plot(results: list[dict], rows: list[dict], prefix: str) -> list[str]:
    """validation loss vs tokens (seed 0 curves), and final loss vs bytes per peer per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for r in results:
        first.setdefault(r["setup"]["name"], r)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, r in first.items():
        style = "--" if r["setup"]["kind"] != "nord" else "-"
        ax.plot(r["curve"]["tokens"][1:], r["curve"]["val_loss"][1:], style, marker=".", label=name)
    ax.set_xlabel("training tokens (all peers)")
    ax.set_ylabel("validation loss (nats/token, subset)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths = [f"{prefix}_loss.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    paths.append(plot_frontier(rows, f"{prefix}_frontier.png"))
    curve = gap_curve(results)
    if curve["vs_dense"]:
        gaps = {n: (curve["round"][1:], g[1:]) for n, g in curve["vs_dense"].items() if n != "dense"}
        paths.append(plot_gap(gaps, f"{prefix}_gap.png"))
    return paths


GOAL = (300.0, 1.5)  # issue 21: ≥ 300× fewer bytes than dense fp32 averaging at ≤ +1.5% validation loss


def plot_frontier(rows: list[dict], path: str) -> str:
    """Final validation loss against × fewer bytes than dense (log), one marker per setup (error bar: the
    spread over seeds); against dense in % with the goal region shaded when dense is among the rows."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r["val_loss"] for r in rows if r["setup"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(r for r in rows if r["bytes_per_peer_round"] > 0 and r["setup"] != "dense"):
        scale = 100 / dense if dense else 1.0
        y = (r["val_loss"] - dense) * scale if dense else r["val_loss"]
        spread = (r["val_loss_spread"] or 0) * scale / 2
        label = f"{r['setup']} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
        ax.errorbar(r["byte_ratio_vs_dense"], y, yerr=spread, fmt="x" if r["bench_side"] else "o",
                    color=colors[i % len(colors)], capsize=3, label=label)  # fmt: skip
    ax.set_xscale("log")
    times = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×")
    ax.xaxis.set_major_formatter(times)
    ax.xaxis.set_minor_formatter(times)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    if dense:
        (x0, x1), (y0, _) = ax.get_xlim(), ax.get_ylim()
        right, bottom = max(x1, 2 * GOAL[0]), min(y0, -0.5)
        ax.fill_between([GOAL[0], right], bottom, GOAL[1], color="green", alpha=0.1, label="goal (issue 21)")
        ax.axhline(0, color="gray", ls=":", lw=1)
        ax.set_xlim(x0, right)
        ax.set_ylim(bottom=bottom)
    ax.set_xlabel("× fewer bytes per peer per round than dense fp32 averaging")
    ax.set_ylabel("final validation loss vs dense (%)" if dense else "final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_gap(gaps: dict[str, tuple[list[int], list[float]]], path: str) -> str:
    """Validation loss vs dense (%) against rounds, one line per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, (rounds, gap) in gaps.items():
        ax.plot(rounds, [100 * g for g in gap], marker=".", label=name)
    ax.axhline(0, color="gray", ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss vs dense (%, subset, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_LOG_POINT = re.compile(r"(?P<setup>\S+) seed (?P<seed>\d+) round (?P<round>\d+): val (?P<loss>\d+\.\d+)$")


def progress_points(paths: list[str]) -> list[dict]:
    """Validation points of runs that may not have finished: lines of --progress JSONL files, the bench's
    own log lines (`NAME seed S round R: val L`, without bytes), or the curves of finished runs' --out
    JSON; the first of duplicates kept."""
    points: dict[tuple, dict] = {}
    for path in paths:
        if path.endswith(".json"):  # a finished run's --out file: its curves
            for run in json.loads(Path(path).read_text())["runs"]:
                curve, name, by_round = run["curve"], run["setup"]["name"], run["bytes_per_peer_by_round"]
                for rnd, loss in zip(curve["round"][1:], curve["val_loss"][1:], strict=True):
                    sent = sum(by_round[:rnd]) if by_round else 0.0
                    point = {"setup": name, "seed": run["seed"], "round": rnd, "val_loss": loss}
                    points.setdefault((name, run["seed"], rnd), {**point, "bytes_per_peer_total": sent})
            continue
        for line in Path(path).read_text().splitlines():
            if line.startswith("{"):
                point = json.loads(line)
            elif match := _LOG_POINT.search(line):
                point = {"setup": match["setup"], "seed": int(match["seed"]), "round": int(match["round"]),
                         "val_loss": float(match["loss"])}  # fmt: skip
            else:
                continue
            points.setdefault((point["setup"], point["seed"], point["round"]), point)
    return list(points.values())


def partial_report(points: list[dict], dense_bytes: float, out: Path, plots: str | None = None) -> None:
    """Subset validation loss, gap to dense and bytes so far at every round any run reached."""
    table: dict[str, dict[int, list[dict]]] = {}
    for p in points:
        table.setdefault(p["setup"], {}).setdefault(p["round"], []).append(p)
    rows = []
    for rnd in sorted({p["round"] for p in points}):
        row = {"round": rnd}
        dense = table.get("dense", {}).get(rnd)
        for name, by_round in table.items():
            if rnd not in by_round:
                continue
            cell = {
                "val_loss": statistics.fmean(p["val_loss"] for p in by_round[rnd]),
                "seeds": len(by_round[rnd]),
            }
            if dense:
                cell["vs_dense"] = cell["val_loss"] / statistics.fmean(p["val_loss"] for p in dense) - 1
            sent = by_round[rnd][0].get("bytes_per_peer_total")
            if sent:
                cell["bytes_per_peer_round"] = sent / rnd
                cell["byte_ratio_vs_dense"] = dense_bytes * rnd / sent
            row[name] = cell
        rows.append(row)
    names = list(table)
    print("round " + "".join(f"{n:>30}" for n in names))
    for row in rows:
        cells = []
        for n in names:
            c = row.get(n)
            text = "-" if c is None else f"{c['val_loss']:.3f}"
            if c and "vs_dense" in c:
                text += f" ({100 * c['vs_dense']:+.1f}%)"
            if c and "byte_ratio_vs_dense" in c:
                text += f" {c['byte_ratio_vs_dense']:.0f}x"
            cells.append(text)
        print(f"{row['round']:>5} " + "".join(f"{c:>30}" for c in cells))
    gaps = {
        n: ([r["round"] for r in rows if "vs_dense" in r.get(n, {})],
            [r[n]["vs_dense"] for r in rows if "vs_dense" in r.get(n, {})])
        for n in names if n != "dense"
    }  # fmt: skip
    png = plot_gap({n: g for n, g in gaps.items() if g[0]}, (plots or str(out.with_suffix(""))) + "_gap.png")
    atomic_write_bytes(out, json.dumps({"partial": True, "rows": rows, "plots": [png]}, indent=1).encode())
    print(f"wrote {out} and {png}")


def combined_runs(paths: list[str]) -> tuple[dict, list[dict]]:
    """The shape and runs of earlier --out files; they must share one shape (the same tokens per run).
    Runs validated at different cadences keep the rounds they all evaluated (eval_every becomes the
    spacing of those); a run of the same setup and seed in a later file replaces the earlier one (a re-run
    at a newer commit)."""
    docs = [json.loads(Path(path).read_text()) for path in paths]

    def tokens_shape(doc: dict) -> dict:  # where and how often a run logged does not change what it trained
        return {k: v for k, v in doc["shape"].items() if k not in ("progress", "eval_every")}

    shape = tokens_shape(docs[0])
    for path, doc in zip(paths, docs, strict=True):
        if tokens_shape(doc) != shape:
            raise ConfigError(f"{path} has another run shape than {paths[0]}: {doc['shape']} vs {shape}")
    latest = {(run["setup"]["name"], run["seed"]): run for doc in docs for run in doc["runs"]}
    runs = list(latest.values())
    common = set.intersection(*(set(run["curve"]["round"]) for run in runs))
    for run in runs:
        keep = [i for i, rnd in enumerate(run["curve"]["round"]) if rnd in common]
        run["curve"] = {key: [values[i] for i in keep] for key, values in run["curve"].items()}
    rounds = sorted(common)
    every = rounds[1] - rounds[0] if len(rounds) > 1 else docs[0]["shape"]["eval_every"]
    return {**shape, "eval_every": every}, runs


def report(results: list[dict], names: list[str], out: Path, plots: str | None, extra: dict) -> None:
    """Print the table and the gap curve, draw the plots, write the JSON."""
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: (order[r["setup"]["name"]], r["seed"]))
    rows = summarize(results)
    print_table(rows)
    curve = gap_curve(results)
    print_gap_curve(curve)
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = plot(results, rows, plots or str(out.with_suffix("")))
    doc = {**extra, "rows": rows, "gap_curve": curve, "runs": results, "plots": pngs}
    atomic_write_bytes(out, json.dumps(doc, indent=1).encode())
    print(f"wrote {out} and {', '.join(pngs)}")
