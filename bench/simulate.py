"""Benchmarks of `nord simulate`: the cost model's fit, the simulator's speed, sweeps, loopback validation.

    python bench/simulate.py --fit                 # time the real code, fit nord/sim/costs.py's model
    python bench/simulate.py --speed               # 1,000 volunteers x 50 rounds: wall and CPU time
    python bench/simulate.py --sweep               # outputs as N, relays and H vary (tables + PNGs)
    python bench/simulate.py --validate            # N = 4, 8, 16: simulator vs the real loopback swarm

Results go to bench/results/simulate_<part>.json; --sweep also writes docs/simulation/*.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIGURES = ROOT / "docs" / "simulation"


def _machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()}


def _lstsq(xs: list, ys: list[float]) -> tuple[float, float | list[float], float]:
    """(intercept, slope or slopes, max relative residual) of ys ≈ a + b·xs (xs: numbers or rows)."""
    import numpy as np

    x = np.asarray(xs, dtype=np.float64).reshape(len(xs), -1)
    a_mat = np.concatenate([np.ones((len(xs), 1)), x], axis=1)
    coef, *_ = np.linalg.lstsq(a_mat, np.asarray(ys, dtype=np.float64), rcond=None)
    worst = max(abs(float(a_mat[i] @ coef) - y) / y for i, y in enumerate(ys))
    slopes = [float(c) for c in coef[1:]]
    return float(coef[0]), slopes if x.shape[1] > 1 else slopes[0], float(worst)


def _best_of(fn, repeats: int = 3, setup=lambda: None) -> float:
    """Best CPU seconds of `fn(setup())` over `repeats` runs (setup not timed)."""
    best = float("inf")
    for _ in range(repeats):
        arg = setup()
        t = time.process_time()
        fn(arg) if arg is not None else fn()
        best = min(best, time.process_time() - t)
    return best


def fit() -> dict:
    """Time decode+add, scoring and folding on the real code (1 thread, best of 3 CPU times); measure
    envelope and digest bytes; fit the affine models nord/sim/costs.py uses."""
    import types

    import msgpack
    import torch

    sys.path.insert(0, str(ROOT))
    from coordinator.validate import ValidationConfig, Validator
    from nord.codec import CodecConfig, DeltaEncoder, decode_envelope, density_for_round
    from nord.config import TrainConfig
    from nord.crdt import MergeConfig, Replica
    from nord.identity import Identity
    from nord.model import NordLM
    from nord.recipes import get_config
    from nord.sim import costs

    torch.set_num_threads(1)
    key = Identity.from_private_bytes(bytes([1]) * 32)
    rows: dict[str, list] = {"sizes": [], "merge": [], "validate": [], "fold": [], "digest": []}
    for recipe in ("tiny", "small"):
        model = NordLM(get_config(recipe))
        spec = model.param_spec()
        base = {k: p.detach().clone() for k, p in model.named_parameters()}
        params = sum(t.numel() for t in base.values())

        def replica(spec=spec, base=base):
            return Replica(run_id="fit", spec=spec, base=base, merge=MergeConfig(), authorities=[])

        gen = torch.Generator().manual_seed(0)
        delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in spec.items()}
        sizes, cfg, base_hash = costs.measure_sizes(recipe), CodecConfig(), replica().base_hash
        for rnd in range(cfg.warmup_rounds + 1):  # envelope bytes against the affine model
            density = density_for_round(cfg, rnd)
            env = DeltaEncoder(CodecConfig(density=density, warmup_rounds=0), spec).encode(
                delta, run_id="fit", round=0, base_hash=base_hash, identity=key
            )
            model_bytes = sizes.envelope_bytes(rnd)
            rows["sizes"].append(
                {
                    "recipe": recipe,
                    "round": rnd,
                    "density": density,
                    "bytes": env.nbytes,
                    "model": model_bytes,
                }
            )
            data = env.to_bytes()

            def decode_add(target, data=data, spec=spec):
                target.add(decode_envelope(data, spec, run_id="fit"))

            cpu_s = _best_of(decode_add, setup=replica)
            rows["merge"].append({"recipe": recipe, "bytes": len(data), "params": params, "cpu_s": cpu_s})
        run = types.SimpleNamespace(model=get_config(recipe), train=TrainConfig(), merge=MergeConfig())
        validator = Validator(run, RandomTokens(run.model.vocab_size), ValidationConfig())
        validator.base(base_hash, base)
        rows["validate"].append(
            {
                "recipe": recipe,
                "params": params,
                "cpu_s": _best_of(lambda v=validator, e=env, h=base_hash, b=base: v.score(e, h, b)),
            }
        )
        held = replica()
        held.add(decode_envelope(data, spec, run_id="fit"))
        rows["fold"].append({"recipe": recipe, "params": params, "cpu_s": _best_of(held.weights)})
        if recipe == "tiny":  # digest bytes against the number of held dots
            held = replica()
            for k in range(1, 17):
                who = Identity.from_private_bytes(bytes([100 + k]) * 32)
                held.add(
                    DeltaEncoder(cfg, spec).encode(
                        delta, run_id="fit", round=0, base_hash=base_hash, identity=who
                    )
                )
                if k in (1, 2, 4, 8, 16):
                    body = msgpack.packb({"run_id": "fit", "digest": held.digest()}, use_bin_type=True)
                    rows["digest"].append({"dots": k, "bytes": len(body)})
    merge = _lstsq([[r["bytes"], r["params"]] for r in rows["merge"]], [r["cpu_s"] for r in rows["merge"]])
    validate = _lstsq([r["params"] for r in rows["validate"]], [r["cpu_s"] for r in rows["validate"]])
    fold = _lstsq([r["params"] for r in rows["fold"]], [r["cpu_s"] for r in rows["fold"]])
    digest = _lstsq([r["dots"] for r in rows["digest"]], [r["bytes"] for r in rows["digest"]])
    size_err = max(abs(r["model"] - r["bytes"]) / r["bytes"] for r in rows["sizes"])
    fits = {
        "merge_s": {
            "fixed": merge[0],
            "per_byte": merge[1][0],
            "per_param": merge[1][1],
            "max_rel_residual": merge[2],
        },
        "validate_s": {"fixed": validate[0], "per_param": validate[1], "max_rel_residual": validate[2]},
        "fold_s": {"fixed": fold[0], "per_param": fold[1], "max_rel_residual": fold[2]},
        "digest_bytes": {"fixed": digest[0], "per_dot": digest[1], "max_rel_residual": digest[2]},
        "envelope_bytes_max_rel_error": size_err,
    }
    return {"machine": _machine(), "fits": fits, **rows}


class RandomTokens:
    """Held-out batches of random token ids: scoring costs the same forward passes as on real text."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def batches(self, split: str, batch_size: int, seq_len: int):
        import torch

        gen = torch.Generator().manual_seed(1)
        while True:
            x = torch.randint(0, self.vocab, (batch_size, seq_len + 1), generator=gen)
            yield x[:, :-1], x[:, 1:]


def _gossip_bench():
    """bench/gossip.py as a module (its peer processes re-run that file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gossip", ROOT / "bench" / "gossip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_loopback(requests: int = 30, mbytes: int = 20):
    """What this machine gives the swarm: framed stream rate, and the wall time of a small request
    (`hello`: frame, hash, handler thread, reply) between two processes, as `Loopback`."""
    from nord.gossip import hello
    from nord.sim.loopback import Loopback
    from nord.transport import Transport, TransportConfig

    gossip = _gossip_bench()
    server = gossip.PeerProcess([]).wait_ready()
    client = Transport.start(TransportConfig(local_only=True, initial_peers=tuple(server.maddrs)))
    try:
        walls = []
        for _ in range(requests):
            t = time.perf_counter()
            hello(client, server.peer_id, gossip.RUN)
            walls.append(time.perf_counter() - t)
        payload = os.urandom(mbytes << 20)
        t = time.perf_counter()
        client.request(server.peer_id, "sink", payload, timeout_s=600, max_reply_bytes=64)
        rate = len(payload) / (time.perf_counter() - t)
    finally:
        client.shutdown()
        server.stop()
    return Loopback(
        bytes_per_s=rate,
        latency_s=0.0,
        request_s=statistics.median(walls),
        cores=os.cpu_count(),
    )


def validate(peers: list[int], repeats: int) -> dict:
    """The real loopback swarm's spread (bench/gossip.py) beside the simulator's, same machine, one run."""
    from nord.sim.loopback import spread
    from nord.transport import TransportConfig

    gossip = _gossip_bench()
    machine = measure_loopback()
    rows = []
    for n in peers:
        real = gossip.bench_spread(
            n, repeats, lambda initial: TransportConfig(local_only=True, initial_peers=tuple(initial))
        )
        sim = spread(n, "tiny", machine)
        real_s, real_bytes = (
            statistics.median(real["all_hold_s"]),
            statistics.median(real["author_bytes_sent"]),
        )
        rows.append(
            {
                "peers": n,
                "real_s": real_s,
                "real_runs_s": real["all_hold_s"],
                "sim_s": sim["all_hold_s"],
                "time_ratio": sim["all_hold_s"] / real_s,
                "real_bytes": real_bytes,
                "sim_bytes": sim["author_bytes_sent"],
                "bytes_ratio": sim["author_bytes_sent"] / real_bytes,
                "envelope_bytes": real["envelope_bytes"],
            }
        )
    return {"machine": _machine(), "loopback": machine.__dict__, "rows": rows}


SWEEP_COLUMNS = (
    ("round_s", "p50", "round s (median)"),
    ("t50_s", "p50", "t50 s"),
    ("t99_s", "p50", "t99 s"),
    ("seal_latency_99_s", "p50", "seal→99% s"),
    ("volunteer_down_MB", "mean", "vol. down MB/round"),
    ("volunteer_up_MB", "mean", "vol. up MB/round"),
    ("public_volunteer_up_MB", "mean", "public vol. up MB/round"),
    ("relay_up_MB", "mean", "relay up MB/round"),
    ("aggregate_MB_per_seal", "mean", "aggregate MB (mean per seal)"),
)


def sweep_row(cfg) -> dict:
    """One simulation reduced to the sweep's columns (per-round bytes: totals / sealed rounds)."""
    from tqdm import tqdm

    from nord.sim import simulate

    cpu = time.process_time()
    with tqdm(total=cfg.rounds, desc=f"N {cfg.peers} {cfg.adopt}: seals", leave=False) as bar:
        s = simulate(cfg, on_seal=lambda _: bar.update())
    cpu = time.process_time() - cpu
    rounds = max(1, s["sealed_rounds"])
    pushes = cfg.adopt != "contributions" and cfg.sync_push != "all"  # rows before 4968361: push to all
    adopt = f"{cfg.adopt}, push to {cfg.sync_push}" if pushes else cfg.adopt
    row = {"peers": cfg.peers, "relays": cfg.relays, "H": cfg.inner_steps, "adopt": adopt}
    row["rounds"] = s["sealed_rounds"]
    for key, stat, _ in SWEEP_COLUMNS:
        value = s[key][stat]
        row[key] = value / rounds if key.endswith("_MB") else value
    c = s["contributions"]
    row |= {
        "coordinator_in_MB_per_round": s["coordinator_in_MB_per_round"],
        "coordinator_cpu_s_per_round": s["coordinator_cpu_s_per_round"],
        "useful_compute_share": s["useful_compute_share"],
        "folded": c["folded"],
        "published": c["published"],
        "dht_failed_gets": s["dht"]["failed_gets"],
        "sim_h": s["sim_seconds"] / 3600,
        "wall_s": s["wall_seconds"],
        "cpu_s": cpu,
        "load": os.getloadavg()[0],
        "coordinator_out_MB_per_round": s["coordinator_out_MB_per_round"],
        "counters": s["counters"],
        "aggregate_dht": s["aggregate_dht"],
    }
    return row


def sweep(
    peers: list[int],
    relays: list[int],
    hs: list[int],
    rounds: int,
    model: str,
    adopt: list[str],
    extra: dict,
    on_row=None,
) -> dict:
    """N's baseline row, then one setting changed at a time (relays, H, another adoption mode)."""
    from tqdm import tqdm

    from nord.sim import SimConfig

    grid = []
    if "contributions" in adopt:
        grid += [(n, 0, hs[0], "contributions") for n in peers]
        grid += [(n, r, hs[0], "contributions") for n in peers for r in relays if r]
        grid += [(n, 0, h, "contributions") for n in peers for h in hs[1:]]
    others = [a for a in adopt if a != "contributions"]
    grid += [(n, r, hs[0], a) for n in peers for a in others for r in sorted({relays[0], relays[-1]})]
    grid.sort(key=lambda setting: setting[0])  # smallest N first; rows are saved as they finish
    out = {"machine": _machine(), "model": model, "rounds": rounds, "extra": extra, "rows": []}
    for n, r, h, a in tqdm(grid, desc="sweep"):
        cfg = SimConfig(peers=n, relays=r, inner_steps=h, rounds=rounds, model=model, adopt=a, **extra)
        out["rows"].append(sweep_row(cfg))
        if on_row is not None:
            on_row(out)
    return out


def sweep_table(rows: list[dict]) -> str:
    head = [
        "N",
        "relays",
        "H",
        "adopt",
        *[label for *_, label in SWEEP_COLUMNS],
        "coord. in MB/round",
        "coord. out MB/round",
        "coord. CPU s/round",
        "useful compute",
        "folded/published",
        "DHT gets failed",
        "sim h",
        "wall s",
        "CPU s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "--:|" * len(head)]
    for r in rows:
        cells = [
            r["peers"],
            r["relays"],
            r["H"],
            r["adopt"],
            *[_num(r[k]) for k, *_ in SWEEP_COLUMNS],
            _num(r["coordinator_in_MB_per_round"]),
            _num(r.get("coordinator_out_MB_per_round", math.nan)),
            _num(r["coordinator_cpu_s_per_round"]),
            f"{100 * r['useful_compute_share']:.2f}%",
            f"{r['folded']}/{r['published']}",
            r["dht_failed_gets"],
            _num(r["sim_h"]),
            _num(r["wall_s"]),
            _num(r.get("cpu_s", math.nan)),
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _num(x: float) -> str:
    if x != x:
        return "–"
    if x == float("inf"):
        return "never"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def sweep_plots(rows: list[dict], stem: str) -> list[Path]:
    """Metric against N, one line per (relays, H) setting, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    metrics = [
        ("round_s", "round duration, s (median)"),
        ("volunteer_down_MB", "download per volunteer per round, MB"),
        ("public_volunteer_up_MB", "upload per public volunteer per round, MB"),
        ("coordinator_cpu_s_per_round", "coordinator CPU per sealed round, s"),
        ("coordinator_in_MB_per_round", "coordinator inbound per sealed round, MB"),
        ("coordinator_out_MB_per_round", "coordinator outbound per sealed round, MB"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    settings = sorted({(r["relays"], r["H"], r["adopt"]) for r in rows})
    for ax, (key, label) in zip(axes.flat, metrics, strict=True):
        for relays, h, adopt in settings:
            pts = sorted(
                (r["peers"], r[key]) for r in rows if (r["relays"], r["H"], r["adopt"]) == (relays, h, adopt)
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"relays {relays}, H {h}, adopt {adopt}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("volunteers N")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    path = FIGURES / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fit", action="store_true", help="fit the CPU and size models to the real code")
    parser.add_argument("--validate", action="store_true", help="simulator vs the real loopback swarm")
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16], help="--validate: swarm sizes")
    parser.add_argument("--repeats", type=int, default=3, help="--validate: contributions per size")
    parser.add_argument("--sweep", action="store_true", help="outputs as N, relays and H vary")
    parser.add_argument("--sweep-peers", type=int, nargs="+", default=[100, 300, 1000], help="--sweep: N")
    parser.add_argument("--sweep-relays", type=int, nargs="+", default=[0, 8], help="--sweep: relays")
    parser.add_argument("--sweep-h", type=int, nargs="+", default=[20, 200], help="--sweep: H (first: base)")
    parser.add_argument("--rounds", type=int, default=12, help="--sweep: rounds per simulation")
    parser.add_argument(
        "--adopt",
        nargs="+",
        default=["contributions"],
        help="--sweep: adoption modes (contributions: every relays and H row; others: first and last relays)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="--sweep: SimConfig KEY=VALUE for every row")
    parser.add_argument("--model", default="small", help="--sweep: recipe")
    parser.add_argument("--name", default="sweep", help="--sweep: result and figure name")
    parser.add_argument("--speed", action="store_true", help="time 1,000 volunteers x 50 rounds")
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="NAME",
        help="print the rows of saved sweeps together, plot them as the first",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.fit:
        out = fit()
        print(json.dumps(out, indent=1))
        (RESULTS / "simulate_fit.json").write_text(json.dumps(out, indent=1))
    if args.sweep:
        from nord.sim import SimConfig

        extra = {k: type(getattr(SimConfig(), k))(v) for k, v in (item.split("=", 1) for item in args.set)}
        path = RESULTS / f"simulate_{args.name}.json"
        out = sweep(
            args.sweep_peers,
            args.sweep_relays,
            args.sweep_h,
            args.rounds,
            args.model,
            args.adopt,
            extra,
            on_row=lambda partial: path.write_text(json.dumps(partial, indent=1)),
        )
        print(sweep_table(out["rows"]))
        print("figures:", *sweep_plots(out["rows"], args.name))
    if args.table:
        latest = {}  # a setting measured again in a later file replaces the earlier row
        for name in args.table:
            for row in json.loads((RESULTS / f"simulate_{name}.json").read_text())["rows"]:
                latest[(row["peers"], row["relays"], row["H"], row["adopt"])] = row
        rows = sorted(
            latest.values(),
            key=lambda r: (r["peers"], r["adopt"] != "contributions", r["adopt"], r["relays"], r["H"]),
        )
        print(sweep_table(rows))
        print("figures:", *sweep_plots(rows, args.table[0]))
    if args.speed:
        from nord.sim import SimConfig, simulate

        simulate(SimConfig(peers=10, rounds=1))  # sizes measured and cached outside the timing
        wall, cpu = time.perf_counter(), time.process_time()
        s = simulate(SimConfig(peers=1000, rounds=50))
        out = {
            "machine": _machine(),
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
            "sealed_rounds": s["sealed_rounds"],
            "sim_h": s["sim_seconds"] / 3600,
        }
        (RESULTS / "simulate_speed.json").write_text(json.dumps(out, indent=1))
        print(json.dumps(out))
    if args.validate:
        out = validate(args.peers, args.repeats)
        (RESULTS / "simulate_validate.json").write_text(json.dumps(out, indent=1))
        print(f"machine: {out['loopback']}, load {out['machine']['load']}")
        print("| N | real s (median) | sim s | sim/real | real bytes | sim bytes | sim/real |")
        print("|--:|--:|--:|--:|--:|--:|--:|")
        for r in out["rows"]:
            print(
                f"| {r['peers']} | {r['real_s']:.3f} | {r['sim_s']:.3f} | {r['time_ratio']:.2f} | "
                f"{r['real_bytes']:,} | {r['sim_bytes']:,} | {r['bytes_ratio']:.3f} |"
            )


if __name__ == "__main__":
    main()
