"""How long the coordinator's `Authority` holds the gossip lock — what every peer's request handler waits
on — against the whole step: scoring, evaluation, checkpoint writes and pushes run outside it.

Real `Authority`, on-disk `Replica` and `History`, a `Validator` on a small synthetic corpus; each round
`--quorum` workers add one signed contribution (a random delta, as a push handler would, under the lock)
and steps run until the round is sealed. The lock is wrapped to time every outermost hold; the replica's
`compact` is timed on its own (two-phase: it holds the lock only to copy a view and to commit; the
folding, hashing and writing of the new generation run outside it).

    python bench/authority_lock.py --models tiny small --rounds 6 --quorum 3

Columns: the step that seals (score + seal + checkpoint + evaluation + compaction), the total and the
longest single hold of the lock in that step, the whole compaction inside the step (held or not), and
the lock held by it, and the share of the step held.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from coordinator.authority import Authority
from coordinator.history import History
from coordinator.validate import ValidationConfig, Validator
from nord.codec import DeltaEncoder
from nord.config import RoundConfig, RunConfig, TrainConfig
from nord.crdt import Replica
from nord.data import DataConfig, prepare
from nord.identity import Identity
from nord.model import NordLM
from nord.recipes import get_config

VOCAB = 512


class TimedLock:
    """An RLock that records how long each outermost hold lasted (seconds)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._since = 0.0
        self.holds: list[float] = []

    def __enter__(self) -> TimedLock:
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1:
            self._since = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.holds.append(time.perf_counter() - self._since)
        self._lock.release()


def corpus(root: Path):
    rng = random.Random(0)
    words = "the king and queen of spring walk over green hills while rivers sing to stars".split()
    (root / "text.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(60))
    )
    return prepare(DataConfig(source=str(root / "text.txt"), vocab_size=VOCAB), root / "data", progress=False)


def measure(model: str, rounds: int, quorum: int, root: Path, data) -> dict:
    authority_key = Identity.from_private_bytes(bytes([1]) * 32)
    workers = [Identity.from_private_bytes(bytes([20 + i]) * 32) for i in range(quorum)]
    run = RunConfig(
        run_id="bench-lock",
        model=get_config(model, vocab_size=VOCAB),
        data=DataConfig(vocab_size=VOCAB),
        train=TrainConfig(inner_steps=1, batch_size=2, seq_len=32),
        rounds=RoundConfig(quorum=quorum, deadline_s=3600.0, keep_checkpoints=2),
        authorities=(authority_key.public_hex,),
    )
    torch.manual_seed(run.train.seed)
    net = NordLM(run.model)
    spec = {k: tuple(v) for k, v in net.param_spec().items()}
    replica = Replica(
        run_id=run.run_id,
        spec=spec,
        base={n: p.detach() for n, p in net.named_parameters()},
        merge=run.merge,
        authorities=[authority_key.public_key],
        log_dir=root / "replica",
    )
    compactions: list[tuple[float, float]] = []  # (whole compaction, lock held in it)
    compact = replica.compact

    def timed_compact(**kw):
        t, holds = time.perf_counter(), len(lock.holds)
        compact(**kw)
        compactions.append((time.perf_counter() - t, sum(lock.holds[holds:])))

    replica.compact = timed_compact
    lock = TimedLock()
    validation = ValidationConfig(batches=1, batch_size=2)
    history = History.open(root / "history.sqlite")
    auth = Authority(
        run=run, replica=replica, identity=authority_key, history=history,
        validator=Validator(run, data, validation), checkpoint_dir=root / "checkpoints",
        validation=validation, lock=lock,
    )  # fmt: skip
    auth.start()
    encoder = DeltaEncoder(run.codec, spec)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in tqdm(range(rounds), desc=model, unit="round"):
        with lock:
            rnd, base_hash = replica.round, replica.base_hash
        for worker in workers:
            delta = {n: torch.randn(s, generator=g) * 1e-4 for n, s in spec.items()}
            env = encoder.encode(delta, run_id=run.run_id, round=rnd, base_hash=base_hash, identity=worker)
            with lock:
                replica.add(env)
        seal = None
        while seal is None:
            lock.holds.clear()
            n_compactions = len(compactions)
            started = time.perf_counter()
            seal = auth.step()
            step_s = time.perf_counter() - started
        rows.append(
            {
                "step_s": step_s,
                "held_s": sum(lock.holds),
                "longest_hold_s": max(lock.holds),
                "compact_s": sum(c for c, _ in compactions[n_compactions:]),
                "compact_held_s": sum(h for _, h in compactions[n_compactions:]),
            }
        )
    auth.close()
    replica.close()
    history.close()
    warm = rows[1:] or rows  # the first seal also warms caches
    med = {k: statistics.median(r[k] for r in warm) for k in warm[0]}
    return {
        "model": model,
        "parameters": net.num_params(),
        "rounds": rounds,
        "quorum": quorum,
        "median": med,
        "max": {k: max(r[k] for r in warm) for k in warm[0]},
        "held_share": med["held_s"] / med["step_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quorum", type=int, default=3)
    parser.add_argument("--out", default="bench/results/authority_lock.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="nord-bench-lock-") as tmp:
        data = corpus(Path(tmp))
        for model in args.models:
            root = Path(tmp) / model
            root.mkdir()
            results.append(measure(model, args.rounds, args.quorum, root, data))
    print(f"\n{'model':<8} {'params':>10} {'sealing step':>13} {'lock held':>10} {'longest hold':>13} "
          f"{'compaction':>11} {'of it held':>11} {'held share':>11}")  # fmt: skip
    for r in results:
        m = r["median"]
        print(
            f"{r['model']:<8} {r['parameters']:>10,} {m['step_s'] * 1e3:>10.0f} ms "
            f"{m['held_s'] * 1e3:>7.0f} ms {m['longest_hold_s'] * 1e3:>10.0f} ms "
            f"{m['compact_s'] * 1e3:>8.0f} ms {m['compact_held_s'] * 1e3:>8.0f} ms {r['held_share']:>10.0%}"
        )
    out = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
           "threads": 1, "command": "python bench/authority_lock.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k != "out"), "results": results}  # fmt: skip
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
