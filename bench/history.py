"""History that stays fast: API latency and the authority's per-tick cost against the run's length.

For each history size (rounds × contributions per round, default 100 and 10,000 × 50), a real
`history.sqlite` is filled with a synthetic run (peers, sealed rounds, contributions — accepted, a few
rejected and revoked —, metrics, checkpoint rows) through the real schema, its triggers included. Then:

    api     p50/p99 of the real FastAPI app (TestClient, the API's own HistoryReader) for /api/summary,
            /api/rounds (paged, the newest page and one deep in the run), /api/metrics, /api/peers and
            /metrics, while a thread writes through the authority's History at the server's tick rate
            (a contribution, its verdict, a liveness flush every TICK_S)
    tick    CPU ms and SQL statements of one `Authority.step()` of a real authority (tiny model, real
            replica at round N, a sealed round and 3 scored contributions held: the steady state between
            seals), averaged over --ticks steps

The per-tick columns also run on older code (`--parts tick`), which is how the "before" rows were made.

    python bench/history.py                      # 100 and 10,000 rounds, ~3 min on 2 busy cores
    python bench/history.py --rounds 100 10000 --parts tick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from coordinator.authority import Authority
from coordinator.history import History
from coordinator.server import TICK_S
from coordinator.validate import ValidationConfig, Validator
from nord.codec import DeltaEncoder
from nord.config import RoundConfig, RunConfig, TrainConfig
from nord.crdt import Replica
from nord.data import DataConfig, prepare
from nord.identity import Identity
from nord.model import ModelConfig, NordLM

PEERS = 200
T0 = 1_700_000_000.0
ROUND_S = 60.0
AUTHORITY = Identity.from_private_bytes(bytes([1]) * 32)
WORKERS = [Identity.from_private_bytes(bytes([20 + i]) * 32) for i in range(4)]
MODEL = ModelConfig(
    vocab_size=512, d_model=32, n_layers=2, d_mlp=64, n_memory_slots=8, chunk_size=16, max_seq_len=32
)
ENDPOINTS = {
    "/api/summary": "/api/summary",
    "/api/rounds (newest page)": "/api/rounds?limit=100",
    "/api/rounds (deep page)": "/api/rounds?before={middle}&limit=100",
    "/api/metrics (1000 rounds)": "/api/metrics",
    "/api/peers": "/api/peers",
    "/metrics": "/metrics",
}


def _hex(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def fill(path: Path, rounds: int, per_round: int, seed: int = 0) -> None:
    """A synthetic run of `rounds` sealed rounds in the history at `path` (schema from History.open)."""
    History.open(path).close()
    rng = random.Random(seed)
    peers = [_hex("peer", i) for i in range(PEERS)]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO peers(peer, mode, device, first_seen, last_seen) VALUES (?, ?, 'cpu', ?, ?)",
        [(p, rng.choice(("public", "client")), T0, T0 + rounds * ROUND_S) for p in peers],
    )
    for r in tqdm(range(rounds), desc=f"fill {rounds} rounds", unit="round", mininterval=2):
        t = T0 + r * ROUND_S
        rows, revoked = [], []
        for i in range(per_round):
            cid, peer = _hex("c", r, i), rng.choice(peers)
            if rng.random() < 0.04:
                rows.append((cid, r, peer, t + i * 0.1, 40_000, 4096, "revoked", "loss rose", None))
                revoked.append((cid, r, peer, "loss rose", "validator", t + 30))
            else:
                rows.append((cid, r, peer, t + i * 0.1, 40_000, 4096, "accepted", None, r))
        conn.executemany(
            "INSERT INTO contributions(id, round, peer, received_at, bytes, tokens, status, reason, "
            "sealed_in) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.executemany("INSERT INTO revocations VALUES (?, ?, ?, ?, ?, ?)", revoked)
        conn.execute(
            "INSERT INTO rounds(round, opened_at, sealed_at, seal_reason, weights_hash, base_hash) "
            "VALUES (?, ?, ?, 'quorum', ?, ?)",
            (r, t, t + ROUND_S - 1, _hex("w", r + 1), _hex("w", r)),
        )
        loss = 7.0 * math.exp(-r / max(rounds / 4, 1)) + 2.5
        metrics = {"val_loss": loss, "val_ppl": math.exp(loss), "contributors": per_round}
        metrics |= {f"firing_rate/layer{k}": 0.1 + 0.01 * k for k in range(4)}
        conn.executemany("INSERT INTO metrics VALUES (?, ?, ?)", [(r, k, v) for k, v in metrics.items()])
        conn.execute(
            "INSERT INTO checkpoints VALUES (?, ?, ?, 1000000, ?, ?)",
            (r, f"{r}.safetensors", _hex("w", r), t, int(r < rounds - 3)),
        )
    conn.execute("COMMIT")
    conn.close()


# ---- the API ------------------------------------------------------------------------------------------


def writer_ticks(history: History, stop: threading.Event, rounds: int) -> None:
    """What the authority writes between seals, at its tick rate (TICK_S): a new contribution, its
    verdict and a liveness flush, each a transaction under History's lock."""
    n = 0
    while not stop.wait(TICK_S):
        cid = _hex("live", n)
        history.record_contribution(cid, round=rounds, peer=_hex("peer", n % PEERS), nbytes=1, tokens=1)
        history.set_verdict(cid, "accepted")
        history.touch_peers({_hex("peer", n % PEERS): time.time()})
        n += 1


def bench_api(path: Path, rounds: int, requests: int) -> dict[str, dict[str, float]]:
    from fastapi.testclient import TestClient

    from coordinator.api import ApiContext, create_app
    from coordinator.history import HistoryReader

    history = History.open(path)
    history.open_round(rounds, base_hash=_hex("w", rounds), at=T0 + rounds * ROUND_S)
    reader = HistoryReader(path)
    run_config = {"run_id": "bench", "rounds": {"quorum": 50, "deadline_s": 60.0}}
    ctx = ApiContext(history=reader, run_config=run_config, checkpoint_dir=path.parent, model={})
    stop = threading.Event()
    writer = threading.Thread(target=writer_ticks, args=(history, stop, rounds), daemon=True)
    out = {}
    with TestClient(create_app(ctx)) as client:
        writer.start()
        try:
            for name, url in ENDPOINTS.items():
                url = url.format(middle=rounds // 2)
                for _ in range(5):
                    assert client.get(url).status_code == 200, url
                times = []
                for _ in range(requests):
                    start = time.perf_counter()
                    client.get(url)
                    times.append((time.perf_counter() - start) * 1000)
                times.sort()
                out[name] = {
                    "p50_ms": statistics.median(times),
                    "p99_ms": times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)],
                }
        finally:
            stop.set()
            writer.join()
    reader.close()
    history.close()
    return out


# ---- the authority's tick -----------------------------------------------------------------------------


def corpus(root: Path):
    rng = random.Random(0)
    words = "the king and queen of spring walk over green hills while rivers sing to stars".split()
    (root / "text.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(60))
    )
    return prepare(DataConfig(source=str(root / "text.txt"), vocab_size=512), root / "data", progress=False)


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def contribute(authority: Authority, worker: int, seed: int) -> None:
    replica = authority.replica
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(s, generator=g) * 1e-4 for n, s in replica.spec.items()}
    envelope = DeltaEncoder(authority.run.codec, replica.spec).encode(
        delta,
        run_id=replica.run_id,
        round=replica.round,
        base_hash=replica.base_hash,
        identity=WORKERS[worker],
    )
    replica.add(envelope)


def bench_tick(path: Path, rounds: int, data, ticks: int) -> dict[str, float]:
    """The steady-state `Authority.step()` on top of a history of `rounds` rounds."""
    run = RunConfig(
        run_id="bench-history",
        model=MODEL,
        data=DataConfig(vocab_size=512),
        train=TrainConfig(inner_steps=1, batch_size=2, seq_len=32),
        rounds=RoundConfig(quorum=4, deadline_s=60.0, keep_checkpoints=3),
        authorities=(AUTHORITY.public_hex,),
    )
    spec = {k: tuple(v) for k, v in NordLM(run.model).param_spec().items()}
    torch.manual_seed(0)
    base = {n: p.detach() for n, p in NordLM(run.model).named_parameters()}
    replica = Replica(
        run_id=run.run_id, spec=spec, base=base, merge=run.merge, authorities=[AUTHORITY.public_key],
        base_round=rounds, log_dir=path.parent / "replica",
    )  # fmt: skip
    history = History.open(path)
    clock = Clock(T0 + rounds * ROUND_S)
    validation = ValidationConfig(batches=1, batch_size=2)
    authority = Authority(
        run=run, replica=replica, identity=AUTHORITY, history=history,
        validator=Validator(run, data, validation), checkpoint_dir=path.parent / "checkpoints",
        validation=validation, lock=threading.RLock(), clock=clock,
    )  # fmt: skip
    authority.start()
    for w in range(2):
        contribute(authority, w, seed=w)
    authority.step()  # scores both
    clock.now += run.rounds.deadline_s + 1
    assert authority.step() is not None, "round N did not seal"
    for w in range(3):
        contribute(authority, w, seed=10 + w)
    authority.step()  # scores them: 3 < quorum, deadline far: steady state from here
    statements: list[str] = []
    history._conn.set_trace_callback(statements.append)
    start_cpu, start = time.process_time(), time.perf_counter()
    for _ in range(ticks):
        assert authority.step() is None
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    history._conn.set_trace_callback(None)
    getattr(authority, "close", lambda: None)()
    replica.close()
    history.close()
    return {
        "cpu_ms": 1000 * cpu / ticks,
        "wall_ms": 1000 * wall / ticks,
        "statements": len(statements) / ticks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, nargs="+", default=[100, 10_000])
    ap.add_argument("--per-round", type=int, default=50, help="contributions per round")
    ap.add_argument("--parts", nargs="+", choices=("api", "tick"), default=["api", "tick"])
    ap.add_argument("--requests", type=int, default=200, help="timed requests per endpoint")
    ap.add_argument("--ticks", type=int, default=200, help="timed authority steps")
    ap.add_argument("--out", type=Path, default=Path("bench/results/history.json"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="nord-bench-history-") as tmp:
        data = corpus(Path(tmp)) if "tick" in args.parts else None
        for rounds in args.rounds:
            work = Path(tmp) / f"r{rounds}"
            work.mkdir()
            fill(work / "history.sqlite", rounds, args.per_round)
            row = {"rounds": rounds, "contributions": rounds * args.per_round}
            row["file_mb"] = (work / "history.sqlite").stat().st_size / 1e6
            if "api" in args.parts:
                row["api"] = bench_api(work / "history.sqlite", rounds, args.requests)
            if "tick" in args.parts:
                row["tick"] = bench_tick(work / "history.sqlite", rounds, data, args.ticks)
            results.append(row)
    print_table(results)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


def print_table(results) -> None:
    if any("api" in r for r in results):
        print(f"\n{'endpoint':28}" + "".join(f"{r['rounds']:>10,} rounds p50 / p99 ms" for r in results))
        for name in ENDPOINTS:
            cells = "".join(
                f"{r['api'][name]['p50_ms']:>21.1f} / {r['api'][name]['p99_ms']:6.1f}" for r in results
            )
            print(f"{name:28}{cells}")
    if any("tick" in r for r in results):
        print(
            f"\n{'rounds':>10} {'contributions':>14} {'tick CPU ms':>12} {'tick wall ms':>13} {'SQL/tick':>9}"
        )
        for r in results:
            t = r["tick"]
            print(f"{r['rounds']:>10,} {r['contributions']:>14,} {t['cpu_ms']:>12.2f} {t['wall_ms']:>13.2f} "
                  f"{t['statements']:>9.1f}")  # fmt: skip
        first, last = results[0]["tick"], results[-1]["tick"]
        print(f"tick CPU ratio {results[-1]['rounds']:,} / {results[0]['rounds']:,} rounds: "
              f"{last['cpu_ms'] / first['cpu_ms']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
