"""Gossip benchmark on 127.0.0.1: how fast a contribution reaches every peer, and stream throughput.

1. Spread: N peers (N = 4, 8, 16; each its own process with a transport, a replica of the `tiny` model and
   the gossip protocol; all public). One author adds a real encoded contribution and publishes it; every
   peer reports the moment it holds it. Time = from just before `publish` until the last peer holds it
   (time.monotonic is system-wide on Linux, so processes compare).
2. Throughput: one 100 MB payload between two processes, framed (`Transport.request`: length + sha256
   header, 1 MiB writes, hash checked) side by side with a raw hivemind binary stream (same 1 MiB writes,
   no hashing), so the framing's cost shows as a ratio measured in the same run.

    python bench/gossip.py                       # N = 4 8 16, 3 contributions each, 100 MB x 3
    python bench/gossip.py --peers 4 --repeats 1 --mbytes 20      # quick
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

RUN = "bench-gossip"


def _spec_and_base():
    import torch

    from nord.model import NordLM
    from nord.recipes import get_config

    torch.manual_seed(0)
    model = NordLM(get_config("tiny"))
    return model.param_spec(), {k: p.detach() for k, p in model.named_parameters()}


def _replica(spec, base):
    from nord.crdt import MergeConfig, Replica
    from nord.identity import Identity

    authority = Identity.from_private_bytes(bytes([1]) * 32)
    return Replica(run_id=RUN, spec=spec, base=base, merge=MergeConfig(), authorities=[authority.public_key])


def peer_main(args) -> None:
    """A peer process: serve gossip; print a JSON line when ready and whenever a contribution arrives."""
    from nord.gossip import Gossip
    from nord.transport import Transport, TransportConfig

    spec, base = _spec_and_base()
    transport = Transport.start(
        TransportConfig(local_only=True, initial_peers=tuple(args.initial_peers or ()))
    )
    transport.install_signal_handlers()
    seen: set[str] = set()

    def on_update() -> None:
        now = time.monotonic()
        for cid, _ in gossip.replica.contributions():
            if cid not in seen:
                seen.add(cid)
                print(json.dumps({"hold": cid, "t": now}), flush=True)

    gossip = Gossip(transport, _replica(spec, base), "{}", on_update=on_update)
    gossip.serve()
    transport.add_handler("sink", lambda peer, body: len(body).to_bytes(8, "big"), max_request_bytes=1 << 30)

    async def raw_sink(info, reader, writer, keep: bool = False):
        """No checks; `keep` assembles the payload in memory as a handler would need it, else drops it."""
        total, length = 0, int.from_bytes(await reader.readexactly(8), "big")
        body = memoryview(bytearray(length)) if keep else None
        while total < length:
            chunk = await reader.readexactly(min(1 << 20, length - total))
            if keep:
                body[total : total + len(chunk)] = chunk
            total += len(chunk)
        writer.write(total.to_bytes(8, "big"))
        await writer.drain()
        writer.close()

    async def raw_keep(info, reader, writer):
        await raw_sink(info, reader, writer, keep=True)

    transport._run(transport._p2p.add_binary_stream_handler("bench/raw", raw_sink))
    transport._run(transport._p2p.add_binary_stream_handler("bench/raw-keep", raw_keep))
    print(json.dumps({"ready": transport.peer_id, "maddrs": transport.visible_maddrs()}), flush=True)
    try:
        while True:
            time.sleep(1.0)
            gossip.heartbeat()
    except KeyboardInterrupt:
        pass


class PeerProcess:
    def __init__(self, initial: list[str]) -> None:
        cmd = [sys.executable, __file__, "--role", "peer"]
        if initial:
            cmd += ["--initial-peers", *initial]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        self.holds: dict[str, float] = {}

    def wait_ready(self) -> PeerProcess:
        ready = json.loads(self.proc.stdout.readline())
        self.peer_id, self.maddrs = ready["ready"], ready["maddrs"]
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            event = json.loads(line)
            self.holds[event["hold"]] = event["t"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def bench_spread(n_peers: int, repeats: int, author_transport_cfg) -> dict:
    from nord.codec import CodecConfig, DeltaEncoder
    from nord.gossip import Gossip
    from nord.identity import Identity
    from nord.transport import Transport

    spec, base = _spec_and_base()
    first = PeerProcess([]).wait_ready()
    others = [first] + [PeerProcess(first.maddrs) for _ in range(n_peers - 2)]
    for p in others[1:]:
        p.wait_ready()
    author = Transport.start(author_transport_cfg(first.maddrs))
    try:
        gossip = Gossip(author, _replica(spec, base), "{}")
        gossip.serve()
        deadline = time.monotonic() + 60
        while len(gossip.reachable_peers()) < n_peers - 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        times, sent_bytes = [], []
        for r in range(repeats):
            import torch

            delta = {k: torch.randn(shape) * 1e-3 for k, shape in spec.items()}
            # a steady-state contribution: the final density (the warm-up's first rounds send up to 9x more)
            envelope = DeltaEncoder(CodecConfig(warmup_rounds=0), spec).encode(
                delta,
                run_id=RUN,
                round=0,
                base_hash=gossip.replica.base_hash,
                identity=Identity.from_private_bytes(bytes([50 + r]) * 32),
            )
            with gossip.lock:
                gossip.replica.add(envelope)
            cid = envelope.contribution_id
            sent = author.bytes_sent
            start = time.monotonic()
            gossip.publish(envelope)
            sent_bytes.append(author.bytes_sent - sent)  # the pushes are done when publish returns
            deadline = time.monotonic() + 60
            while any(cid not in p.holds for p in others) and time.monotonic() < deadline:
                time.sleep(0.005)
            missing = sum(cid not in p.holds for p in others)
            if missing:
                raise RuntimeError(f"{missing} of {n_peers - 1} peers never got the contribution")
            times.append(max(p.holds[cid] for p in others) - start)
        return {
            "peers": n_peers,
            "envelope_bytes": envelope.nbytes,
            "all_hold_s_median": statistics.median(times),
            "all_hold_s": times,
            "author_bytes_sent": sent_bytes,
        }
    finally:
        author.shutdown()
        for p in others:
            p.stop()


def bench_throughput(mbytes: int, repeats: int, author_transport_cfg) -> dict:
    """Median wall throughput of framed and raw transfers, and the CPU seconds each process spent on them."""
    from nord.transport import Transport

    payload = os.urandom(mbytes * 2**20)
    server = PeerProcess([]).wait_ready()
    client = Transport.start(author_transport_cfg(server.maddrs))
    processes = {
        "client python": [os.getpid()],
        "client p2pd": _children(os.getpid(), exclude=server.proc.pid),
        "server python": [server.proc.pid],
        "server p2pd": _children(server.proc.pid),
    }

    def send_framed() -> None:
        reply = client.request(server.peer_id, "sink", payload, timeout_s=600, max_reply_bytes=64)
        assert int.from_bytes(reply, "big") == len(payload)

    def send_raw(handler: str) -> None:
        assert client._run(_raw_send(client, server.peer_id, handler, payload), timeout=600) == len(payload)

    try:
        result = {"payload_mb": len(payload) / 1e6, "cores": os.cpu_count()}
        sends = {
            "framed": send_framed,
            "raw_kept": lambda: send_raw("bench/raw-keep"),
            "raw": lambda: send_raw("bench/raw"),
        }
        runs = {mode: ([], []) for mode in sends}  # (wall s, {process: cpu s}) per repeat
        for _ in range(repeats):
            for mode, send in sends.items():
                cpu_before = _cpu_seconds(processes)
                start = time.perf_counter()
                send()
                runs[mode][0].append(time.perf_counter() - start)
                time.sleep(0.5)  # let the receiver finish freeing the payload: its CPU belongs to this mode
                cpu_after = _cpu_seconds(processes)
                runs[mode][1].append({k: cpu_after[k] - cpu_before[k] for k in processes})
        for mode, (walls, cpus) in runs.items():
            result[f"{mode}_mb_s"] = result["payload_mb"] / statistics.median(walls)
            result[f"{mode}_s"] = walls
            result[f"{mode}_cpu_ms_per_mb"] = {
                k: 1e3 * statistics.median(c[k] for c in cpus) / result["payload_mb"] for k in processes
            }
        return result
    finally:
        client.shutdown()
        server.stop()


def _children(pid: int, exclude: int | None = None) -> list[int]:
    """Direct child processes of `pid` (the p2pd daemons), from /proc; [] where there is no /proc."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and int(entry.name) != exclude:
            found.append(int(entry.name))
    return found


def _cpu_seconds(processes: dict[str, list[int]]) -> dict[str, float]:
    """User + system CPU seconds so far of each group of processes (all their threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = {}
    for name, pids in processes.items():
        total = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
        totals[name] = total / tick
    return totals


async def _raw_send(transport, peer_id: str, handler: str, payload: bytes) -> int:
    from hivemind.p2p import PeerID

    _, reader, writer = await transport._p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), handler)
    view = memoryview(payload)
    writer.write(len(payload).to_bytes(8, "big"))  # a bare length prefix: no hash, no checks
    for i in range(0, len(view), 1 << 20):
        writer.write(view[i : i + (1 << 20)])
        await writer.drain()
    total = int.from_bytes(await reader.readexactly(8), "big")
    writer.close()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="bench", choices=("bench", "peer"), help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument(
        "--peers", type=int, nargs="+", default=[4, 8, 16], help="swarm sizes N (incl. author)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="contributions per N, and payload repeats")
    parser.add_argument("--mbytes", type=int, default=100, help="payload size for the throughput test (MiB)")
    parser.add_argument("--only", choices=("spread", "throughput"), help="run one part only")
    parser.add_argument("--out", default="bench/results/gossip.json")
    args = parser.parse_args()
    if args.role == "peer":
        peer_main(args)
        return

    from tqdm import tqdm

    from nord.transport import TransportConfig

    def cfg(initial):
        return TransportConfig(local_only=True, initial_peers=tuple(initial))

    load_before = os.getloadavg()
    spread = []
    if args.only != "throughput":
        for n in tqdm(args.peers, desc="spread"):
            spread.append(bench_spread(n, args.repeats, cfg))
    throughput = bench_throughput(args.mbytes, args.repeats, cfg) if args.only != "spread" else None
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "spread": spread,
        "throughput": throughput,
    }
    print(f"\nload average before {load_before[0]:.1f}, after {result['loadavg_after'][0]:.1f}")
    if spread:
        print("\nSpread of one contribution to all peers (loopback, all public)")
        print(f"{'peers':>5} | {'envelope':>9} | {'median s':>8} | all runs (s)")
    for row in spread:
        runs = ", ".join(f"{t:.3f}" for t in row["all_hold_s"])
        print(f"{row['peers']:>5} | {row['envelope_bytes']:>7} B | {row['all_hold_s_median']:>8.3f} | {runs}")
    if throughput is not None:
        _print_throughput(throughput, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


def _print_throughput(t: dict, repeats: int) -> None:
    """Wall throughput, and where the CPU went (two p2pd daemons and two Pythons share the cores)."""
    print(f"\nThroughput of a {t['payload_mb']:.0f} MB payload, one stream (median of {repeats})")
    names = list(t["raw_cpu_ms_per_mb"])
    print(f"{'':32} {'MB/s':>6} | CPU ms per MB: " + " | ".join(f"{n:>13}" for n in names) + " |  total")
    labels = {
        "framed": "framed (len + sha256, verified)",
        "raw_kept": "raw, payload kept in memory",
        "raw": "raw, payload dropped",
    }
    for mode, label in labels.items():
        cpu = t[f"{mode}_cpu_ms_per_mb"]
        cells = " | ".join(f"{cpu[n]:13.2f}" for n in names)
        print(f"{label:32} {t[f'{mode}_mb_s']:6.0f} | {'':15}{cells} | {sum(cpu.values()):6.2f}")
    print(
        f"framed/raw = {t['framed_mb_s'] / t['raw_mb_s']:.2f}, framed/raw kept = "
        f"{t['framed_mb_s'] / t['raw_kept_mb_s']:.2f}; CPU per MB also depends on pacing: a reader that "
        "waits for data wakes up more often"
    )


if __name__ == "__main__":
    main()
