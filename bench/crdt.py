"""Cost of the contribution CRDT at real model sizes: add, remove, materialize, seal, memory.

For each model recipe (spec built on the meta device, random float32 base weights) two real signed
envelopes are encoded with the run's codec (DeltaEncoder, default 64/4096 density) from random deltas at
round 0 with no density warm-up (warmup_rounds=0: with the run default's warm-up round 0 would keep 25%,
so the steady-state rounds' nonzeros are what is measured), then decoded (as a receiving replica
would). Timed per repeat on a fresh Replica:

    add #1     first contribution (also allocates the dense int64/int32 sums: O(model) once)
    add #2     a second contribution: the steady-state cost, O(its nonzeros)
    remove     authority-signed removal of #2 (exact subtraction)
    weights    materialize base + η·S/C (O(model))
    seal       materialize + weights hash + sign + apply

The "~" rows repeat add and materialize with `sparse_sums=True` (per-contribution terms).
To show that add cost follows the nonzeros and not the model size, the largest model also gets a
contribution with about as many nonzeros as the smallest model's ("fixed nnz" row).

    python bench/crdt.py --models small base --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nord.codec import CodecConfig, DeltaEncoder, decode_envelope
from nord.crdt import MergeConfig, Replica
from nord.identity import Identity
from nord.model import NordLM
from nord.recipes import get_config

RUN = "bench-crdt"


def param_spec(model: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return NordLM(get_config(model)).param_spec()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def make_envelope(spec, density, base_hash, identity, seed):
    g = torch.Generator().manual_seed(seed)
    delta = {name: torch.randn(*shape, generator=g) * 1e-3 for name, shape in spec.items()}
    encoder = DeltaEncoder(CodecConfig(density=density, warmup_rounds=0), spec)  # steady-state density
    seconds, env = timed(
        lambda: encoder.encode(delta, run_id=RUN, round=0, base_hash=base_hash, identity=identity)
    )
    decode_s, decoded = timed(lambda: decode_envelope(env.to_bytes(), spec, run_id=RUN, max_bytes=2**31))
    nnz = sum(t.indices.numel() for t in decoded.delta().values())
    return decoded, {"encode_s": seconds, "decode_s": decode_s, "nnz": nnz, "wire_bytes": env.nbytes}


def bench_model(name, spec, density, repeats, fixed_nnz=None):
    params = sum(math.prod(s) for s in spec.values())
    g = torch.Generator().manual_seed(0)
    base = {n: torch.randn(*s, generator=g) for n, s in spec.items()}
    authority, peers = Identity.generate(), [Identity.generate() for _ in range(2)]
    merge = MergeConfig()
    probe = Replica(run_id=RUN, spec=spec, base=base, merge=merge, authorities=[authority.public_key])
    first, info1 = make_envelope(spec, density, probe.base_hash, peers[0], 1)
    second, info2 = make_envelope(spec, density, probe.base_hash, peers[1], 2)
    rows = []
    for _ in tqdm(range(repeats), desc=name, leave=False):
        r = Replica(run_id=RUN, spec=spec, base=base, merge=merge, authorities=[authority.public_key])
        rss0 = rss_bytes()
        add1, _ = timed(lambda r=r: r.add(first))
        rss1 = rss_bytes()
        add2, _ = timed(lambda r=r: r.add(second))
        remove, _ = timed(lambda r=r: r.remove(second.contribution_id, reason="bench", identity=authority))
        weights, _ = timed(lambda r=r: r.weights())
        stats = r.stats()  # before the seal empties the pool
        seal, _ = timed(lambda r=r: r.seal(authority))
        rows.append((add1, add2, remove, weights, seal, rss1 - rss0))
        del r
    best = [min(col) for col in zip(*rows, strict=True)]
    result = {
        "model": name,
        "params": params,
        "nnz": info2["nnz"],
        "density": info2["nnz"] / params,
        "wire_bytes": info2["wire_bytes"],
        "encode_s": info2["encode_s"],
        "decode_s": info2["decode_s"],
        "add_first_s": best[0],
        "add_s": best[1],
        "remove_s": best[2],
        "weights_s": best[3],
        "seal_s": best[4],
        "rss_growth_first_add_bytes": best[5],
        "accumulator_bytes": stats["accumulator_bytes"],
        "accumulator_bytes_per_param": stats["accumulator_bytes"] / params,
        "add_ns_per_nonzero": best[1] / info2["nnz"] * 1e9,
    }
    sparse = Replica(
        run_id=RUN, spec=spec, base=base, merge=merge, authorities=[authority.public_key], sparse_sums=True
    )
    sparse_add1, _ = timed(lambda: sparse.add(first))
    sparse_add2, _ = timed(lambda: sparse.add(second))
    sparse_weights, _ = timed(lambda: sparse.weights())
    held = sparse.stats()["accumulator_bytes"]
    result["sparse"] = {
        "add_first_s": sparse_add1,
        "add_s": sparse_add2,
        "weights_s": sparse_weights,
        "accumulator_bytes_per_param_two_held": held / params,
    }
    if fixed_nnz:
        r = Replica(run_id=RUN, spec=spec, base=base, merge=merge, authorities=[authority.public_key])
        r.add(first)  # allocate the sums first: measure the steady-state add only
        env, info = make_envelope(spec, fixed_nnz / params, r.base_hash, peers[1], 3)
        add_s, _ = timed(lambda: r.add(env))
        result["fixed_nnz"] = {
            "nnz": info["nnz"],
            "add_s": add_s,
            "add_ns_per_nonzero": add_s / info["nnz"] * 1e9,
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["small", "base"], help="recipes, smallest first")
    ap.add_argument(
        "--density", type=float, default=64 / 4096, help="codec density (kept fraction per chunk)"
    )
    ap.add_argument("--repeats", type=int, default=2, help="fresh replicas per model (best time kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/crdt.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = {m: param_spec(m) for m in args.models}
    results = []
    smallest_nnz = None
    for i, model in enumerate(args.models):
        fixed = smallest_nnz if i == len(args.models) - 1 and i > 0 else None
        res = bench_model(model, specs[model], args.density, args.repeats, fixed_nnz=fixed)
        smallest_nnz = smallest_nnz or res["nnz"]
        results.append(res)
    print(f"envelopes encoded at round 0 with warmup_rounds=0 (density {args.density:.4%} from round 0)")
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "round": 0,
        "warmup_rounds": 0,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


def print_table(results) -> None:
    head = (
        f"{'model':<7} {'params':>11} {'nnz':>9} {'add#1 ms':>9} {'add ms':>8} {'ns/nnz':>7} "
        f"{'remove ms':>9} {'weights ms':>10} {'seal ms':>8} {'acc B/param':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['model']:<7} {r['params']:>11,} {r['nnz']:>9,} {r['add_first_s'] * 1e3:>9.1f} "
            f"{r['add_s'] * 1e3:>8.1f} {r['add_ns_per_nonzero']:>7.0f} {r['remove_s'] * 1e3:>9.1f} "
            f"{r['weights_s'] * 1e3:>10.1f} {r['seal_s'] * 1e3:>8.1f} "
            f"{r['accumulator_bytes_per_param']:>11.2f}"
        )
        sp = r["sparse"]
        print(
            f"{r['model'] + '~':<7} {r['params']:>11,} {r['nnz']:>9,} {sp['add_first_s'] * 1e3:>9.1f} "
            f"{sp['add_s'] * 1e3:>8.1f} {'':>7} {'':>9} {sp['weights_s'] * 1e3:>10.1f} {'':>8} "
            f"{sp['accumulator_bytes_per_param_two_held']:>11.2f}   (~ sparse sums, 2 contributions held)"
        )
        if "fixed_nnz" in r:
            f = r["fixed_nnz"]
            print(
                f"{r['model'] + '*':<7} {r['params']:>11,} {f['nnz']:>9,} {'':>9} {f['add_s'] * 1e3:>8.1f} "
                f"{f['add_ns_per_nonzero']:>7.0f}   (* fixed nnz ≈ the smallest model's)"
            )


if __name__ == "__main__":
    main()
