"""How volunteers follow the seals, before/after the aggregate seal, on a real loopback swarm (#19).

A real run on 127.0.0.1 (`nord-coordinator serve`, its `Authority`, and N `nord-node join` workers,
each its own process; half of them in client mode, which nobody can dial), the `tiny` model, for
--rounds sealed rounds, once per `--adopt` mode:

    contributions  today's protocol: every worker gathers every contribution (the all-to-all)
    aggregate      workers push theirs to the coordinator only, sync seals only, and adopt each seal from
                   its aggregate (nord.crdt.aggregate)
    auto           the default: like aggregate, but per seal the fewer bytes of the aggregate and the
                   contributions it lists (at this N, the contributions)

Measured from each worker's round lines (its transport's byte counters when it reports a sealed
round, in MB with two decimals): bytes down and up per worker per round, from the end of round
--skip − 1 to the end of the run (so the snapshot a worker starts from and the 8-round density
warm-up are left out by default), split into public and client-mode workers; and the rounds' median
period from the coordinator's history. Times are wall seconds on a shared 2-core machine: the load
is recorded.

    python bench/adopt.py                                   # N = 4 and 8, 12 rounds, 3 modes
    python bench/adopt.py --peers 4 --rounds 6 --skip 2     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the swarm and process helpers shared with the chaos tests

from soak import seal_latencies  # noqa: E402
from swarm import Swarm  # noqa: E402

MODES = ("contributions", "aggregate", "auto")
ROUND_LINE = re.compile(r"^round (\d+) \|.*\| up ([\d.]+) MB down ([\d.]+) MB \|", re.MULTILINE)


def bytes_at_seals(log: str) -> dict[int, tuple[float, float]]:
    """Round -> (bytes down, bytes up) so far, from a worker's round lines."""
    return {int(r): (float(down) * 1e6, float(up) * 1e6) for r, up, down in ROUND_LINE.findall(log)}


def run_mode(mode: str, peers: int, rounds: int, skip: int, tmp: Path) -> dict:
    """One swarm of `peers` workers in `mode` for `rounds` sealed rounds; bytes per worker per round."""
    names = [f"w{i}" for i in range(peers)]
    client = {name: i % 2 == 1 for i, name in enumerate(names)}
    with Swarm(tmp, run=f"adopt-{mode}") as swarm:
        swarm.init(quorum=peers, inner_steps=3, batch_size=2, seq_len=32)
        swarm.start_coordinator()
        for name in names:
            extra = ("--client-mode",) if client[name] else ()
            swarm.join(name, "--adopt", mode, "--max-rounds", str(rounds), "--compact-every", "4", *extra)
        load: list[float] = []
        deadline = time.monotonic() + 600 + 120 * rounds
        while any(swarm.running[n].poll() is None for n in names):
            if time.monotonic() > deadline:
                raise SystemExit(f"{mode}: workers still running after the deadline")
            load.append(os.getloadavg()[0])
            time.sleep(1.0)
        at = {n: bytes_at_seals(swarm.log(n, tail=1 << 24)) for n in names}
        for n in names:
            code = swarm.running[n].returncode
            if code != 0:
                raise SystemExit(f"{mode}: {n} exited with {code}:\n{swarm.log(n)}")
        periods = [
            r["period_s"] for r in seal_latencies(tmp / "coord") if r["period_s"] and r["round"] >= skip
        ]
        swarm.stop()
    per_worker = {}
    for n in names:
        first, last = skip - 1, max(at[n])
        if first not in at[n]:
            raise SystemExit(f"{mode}: {n} never reported round {first} sealed:\n{swarm.log(n)}")
        span = last - first
        per_worker[n] = {
            "client_mode": client[n],
            "down_per_round": (at[n][last][0] - at[n][first][0]) / span,
            "up_per_round": (at[n][last][1] - at[n][first][1]) / span,
        }

    def mean(key: str, client_mode: bool) -> float:
        values = [w[key] for w in per_worker.values() if w["client_mode"] == client_mode]
        return statistics.mean(values) if values else float("nan")

    return {
        "mode": mode,
        "peers": peers,
        "rounds": rounds,
        "skip": skip,
        "down_per_round_public": mean("down_per_round", False),
        "down_per_round_client": mean("down_per_round", True),
        "up_per_round_public": mean("up_per_round", False),
        "up_per_round_client": mean("up_per_round", True),
        "round_period_s_median": statistics.median(periods) if periods else None,
        "load_avg": [min(load), max(load)] if load else None,
        "workers": per_worker,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8], help="workers per swarm")
    parser.add_argument("--rounds", type=int, default=12, help="sealed rounds per swarm")
    parser.add_argument("--skip", type=int, default=9, help="bytes counted from the end of this round on")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adopt.json")
    args = parser.parse_args()
    if not 1 <= args.skip < args.rounds:
        parser.error("--skip must be at least 1 and below --rounds")
    rows = []
    with tqdm(total=len(args.peers) * len(args.modes), desc="swarms", unit="swarm") as bar:
        for peers in args.peers:
            for mode in args.modes:
                with tempfile.TemporaryDirectory(prefix=f"nord-adopt-{mode}-") as tmp:
                    rows.append(run_mode(mode, peers, args.rounds, args.skip, Path(tmp)))
                bar.update(1)
    out = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print("| N | adopt | kB down/round: public, client | kB up/round: public, client | round s |")
    print("|--:|---|--:|--:|--:|")
    for r in rows:
        kb = [r[f"{k}_per_round_{who}"] / 1e3 for k in ("down", "up") for who in ("public", "client")]
        period = r["round_period_s_median"]
        print(
            f"| {r['peers']} | {r['mode']} | {kb[0]:,.0f}, {kb[1]:,.0f} | {kb[2]:,.0f}, {kb[3]:,.0f} "
            f"| {period:.2f} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
