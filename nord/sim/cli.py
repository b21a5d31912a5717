"""`nord simulate`: run one simulation, print its headline numbers, write JSON and PNGs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path

from nord.errors import ConfigError
from nord.sim.inputs import POPULATIONS, SimConfig

log = logging.getLogger(__name__)

HELP = {
    "peers": "volunteers (the coordinator and --relays come on top)",
    "rounds": "stop after this many sealed rounds",
    "seed": "seed of every random draw (same seed, same result)",
    "model": "recipe whose real envelope sizes and parameter count are used (tiny, small, base, nord-1b)",
    "inner_steps": "H: local steps per round (TrainConfig.inner_steps)",
    "tokens_per_step": "tokens per inner step (batch_size x seq_len)",
    "client_share": "share of volunteers in client mode (behind NAT, nobody can dial them)",
    "relays": "public peers with datacenter links that only serve gossip, besides the coordinator",
    "mix": f"volunteer populations NAME=WEIGHT,... with NAME in {', '.join(POPULATIONS)} "
    "(colab: T4 + notebook link, 12 h sessions; kaggle: P100 + notebook link, 30 h/week quota; "
    "home: T4 + residential link; server: A100 + datacenter link)",
    "rtt_ms": "median round-trip time between two peers, ms (log-normal)",
    "rtt_sigma": "sigma of log(RTT)",
    "mfu": "share of a GPU's fp16 peak that training achieves",
    "straggler_share": "share of volunteers that train --straggler-factor times slower",
    "straggler_factor": "slowdown of a straggler",
    "colab_mean_h": "mean Colab session before preemption, hours (capped at 12 h)",
    "kaggle_quota_h": "Kaggle GPU quota, hours a week (sessions capped at 12 h)",
    "home_mean_h": "mean session of home and server volunteers, hours",
    "offline_mean_h": "mean gap before a volunteer rejoins with its state, hours",
    "poison_share": "share of volunteers whose contributions fail validation",
    "withhold_share": "share of volunteers (public ones) that accept pushes but serve nothing",
    "equivocate_share": "share of volunteers that send two payloads for one round",
    "quorum": "seal once this many contributions are accepted (RoundConfig.quorum)",
    "deadline_s": "... or this long after the round opened (RoundConfig.deadline_s)",
    "max_staleness": "rounds a contribution may still be folded into (MergeConfig.max_staleness)",
    "poll_s": "worker anti-entropy interval, seconds (nord-node join --poll-s)",
    "fanout": "sync partners per worker anti-entropy pass",
    "ban_after": "rejections before the coordinator bans a peer",
    "coordinator_cores": "contributions the coordinator scores at once",
    "cost_scale": "multiplier on the fitted CPU times (e.g. 0.1 for a coordinator with a GPU)",
    "adopt": "how volunteers adopt a seal: contributions (gather every contribution), aggregate (push "
    "ours to the coordinator and relays only, sync seals only, download each round's aggregate from a "
    "holder found in the DHT) or auto (as aggregate, but fetch the listed contributions from a "
    "bootstrap peer when that is fewer bytes: nord.protocol.adopt_by_contributions)",
    "sync_push": "whom a sync pushes the contributions a partner lacks: gatherers (peers that gather "
    "contributions: Gossip.sync_with since commit 4968361) or all (seals-only peers too: the code before)",
}


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item]
        return tuple((name.strip(), float(weight)) for name, weight in pairs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT,... got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate the swarm (SimPy) at 100-10,000 volunteers",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("sim.json"), help="summary JSON; PNGs go beside it")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(SimConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "mix":
            default = ",".join(f"{n}={w:g}" for n, w in f.default)
            p.add_argument(
                flag, type=parse_mix, default=f.default, help=HELP[f.name] + f" (default {default})"
            )
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=HELP[f.name])
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from nord.sim import simulate
    from nord.sim.metrics import plot

    fields = {f.name for f in dataclasses.fields(SimConfig)} - {"extra"}
    cfg = SimConfig(**{name: getattr(args, name) for name in fields})
    if not args.out.parent.is_dir():
        raise ConfigError(f"--out: directory {args.out.parent} does not exist")
    with tqdm(total=cfg.rounds, desc=f"simulate N={cfg.peers}", unit="round", disable=args.quiet) as bar:
        summary = simulate(cfg, on_seal=lambda r: bar.update(1))
    args.out.write_text(json.dumps(summary, indent=1, default=str, allow_nan=True))
    pngs = [] if args.no_plots else plot(summary, args.out)
    for line in headline(summary):
        print(line)
    print(f"wrote {args.out}" + "".join(f", {p}" for p in pngs))
    return 0


def headline(s: dict) -> list[str]:
    def fmt(x: float) -> str:
        return "never" if math.isinf(x) else f"{x:.1f}"

    c = s["contributions"]
    return [
        f"{s['sealed_rounds']} rounds in {s['sim_seconds'] / 3600:.2f} simulated h "
        f"({s['wall_seconds']:.0f} s wall)",
        f"round duration      median {fmt(s['round_s']['p50'])} s",
        f"50% hold a contrib. median {fmt(s['t50_s']['p50'])} s, 99%: median {fmt(s['t99_s']['p50'])} s",
        f"volunteer up/down   mean {s['volunteer_up_MB']['mean']:.0f} / "
        f"{s['volunteer_down_MB']['mean']:.0f} MB",
        f"coordinator in      {s['coordinator_in_MB_per_round']:.0f} MB/round, "
        f"CPU {s['coordinator_cpu_s_per_round']:.1f} s/round",
        f"useful compute      {100 * s['useful_compute_share']:.1f}%",
        f"contributions       {c['published']} published, {c['folded']} folded, "
        f"{c['rejected_by_validation']} rejected, {c['never_folded']} never folded",
    ]
