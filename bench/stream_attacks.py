"""Stream attacks on one peer, measured: what 20 streams that claim 97 MiB and send nothing, and a slow
drip, cost a victim, on this tree and (with --ref) on an older revision side by side, in one run.

The victim (tests/security/streams_peer.py `victim`, a process serving the gossip handlers) runs from the
tree being measured; the attackers (`flood`, `drip`, also processes) and the observer (this process, a
third peer sending `hello` requests) run from this tree. Per tree it reports the victim's RSS before the
attack and its peak while the flood's streams are held, the observer's hello latency meanwhile, what
the flood's streams and the drip got back, and how long the drip lasted.

    python bench/stream_attacks.py                          # this tree only
    python bench/stream_attacks.py --ref f5921c5~1          # also the tree before the stream limits

Writes bench/results/stream_attacks.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = Path("tests/security/streams_peer.py")
sys.path.insert(0, str(ROOT / "bench"))
from _revision import older_tree, print_side_by_side  # noqa: E402

RUN = "crdt-test"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


class Lines:
    """A process whose stdout lines are collected as they come."""

    def __init__(self, args: list[str], *, cwd: Path, pythonpath: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(
            target=lambda: self.lines.extend(x.strip() for x in self.proc.stdout), daemon=True
        ).start()

    def first(self, pred, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = next((x for x in list(self.lines) if pred(x)), None)
            if found is not None:
                return found
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(tree: Path, args) -> dict:
    from nord.gossip import hello
    from nord.transport import Transport, TransportConfig, peer_id_of

    victim = Lines([str(PEER_SCRIPT), "victim", str(args.idle)], cwd=tree, pythonpath=tree)
    attackers: list[Lines] = []
    try:
        addr = victim.first(lambda x: x.startswith("/ip4/"), 120)
        target = peer_id_of(addr)
        with Transport.start(TransportConfig(local_only=True, initial_peers=(addr,))) as observer:
            for _ in range(3):
                hello(observer, target, RUN)
            before = rss_mib(victim.proc.pid)
            flood = Lines([str(PEER_SCRIPT), "flood", addr, str(args.streams)], cwd=ROOT, pythonpath=ROOT)
            drip = Lines([str(PEER_SCRIPT), "drip", addr, str(args.drip_interval)], cwd=ROOT, pythonpath=ROOT)
            attackers += [flood, drip]
            assert flood.first(lambda x: x == "holding", 120), "the flood never opened its streams"
            peak, latencies = before, []
            for _ in range(args.samples):
                started = time.monotonic()
                hello(observer, target, RUN)
                latencies.append(time.monotonic() - started)
                peak = max(peak, rss_mib(victim.proc.pid))
                time.sleep(0.5)
            wait_s = args.idle + 60
            flood_reply = flood.first(lambda x: x.startswith("{"), wait_s)
            drip_reply = drip.first(lambda x: x.startswith("{"), wait_s)
    finally:
        for p in attackers + [victim]:
            p.stop()
    replies = json.loads(flood_reply)["replies"] if flood_reply else []
    dripped = json.loads(drip_reply) if drip_reply else None
    return {
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_growth_mib": round(peak - before, 1),
        "hello_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "hello_max_ms": round(max(latencies) * 1000, 1),
        "flood_refused": sum("too many concurrent streams" in r for r in replies),
        "flood_cut_idle": sum("stream cut" in r for r in replies),
        "flood_unanswered": args.streams - len(replies),
        "drip": dripped["reply"] if dripped else f"no reply within {args.idle + 60} s",
        "drip_s": round(dripped["after_s"], 1) if dripped else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", help="also measure this git revision (in a temporary worktree)")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--idle", type=float, default=20.0, help="the victim's idle timeout, s")
    parser.add_argument("--drip-interval", type=float, default=2.0, help="s between the drip's bytes")
    parser.add_argument("--samples", type=int, default=10, help="RSS samples while the flood holds")
    parser.add_argument("--out", default=str(ROOT / "bench/results/stream_attacks.json"))
    args = parser.parse_args()

    results = {}
    with older_tree(args.ref, carry=(PEER_SCRIPT,)) as old:  # the same victim, on the older library
        trees = {args.ref: old, "this tree": ROOT} if old else {"this tree": ROOT}
        for name, tree in trees.items():
            print(f"measuring {name} ...", flush=True)
            results[name] = measure(tree, args)
    print_side_by_side(results, 22, 34)
    record = {
        "command": "python bench/stream_attacks.py" + (f" --ref {args.ref}" if args.ref else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "streams": args.streams,
        "idle_timeout_s": args.idle,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
