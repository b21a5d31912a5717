"""Real aggregate sizes (nord.crdt.aggregate): seal rounds of k real contributions and measure the wire bytes.

    python bench/aggregate.py                                   # small, k = 1 .. 300, rounds 0 and 8
    python bench/aggregate.py --model tiny --ks 1 10 --rounds 8 # quick

For each codec density (a warm-up round's, `density_for_round`) and each k, a fresh `Replica` of the
recipe's real initial weights adds the first k of a set of real envelopes (random deltas, σ = --scale,
each encoded by its own `DeltaEncoder` and signed by its own key), the authority seals, and
`Aggregate.build(*replica.aggregate_parts())` gives the aggregate; its `to_bytes()` is the wire size.
Recorded: bytes, the changed fraction of the weights, bitmap and XOR bytes, bytes per changed coordinate,
and the k envelopes' bytes together. Random deltas keep independent top-k indices, so the changed fraction
is about the union 1 − (1 − d)^k: an upper bound for real training deltas, whose kept indices overlap.
The fit of the simulator's size model (nord/sim/costs.py `aggregate_bytes`) to these rows is printed and
saved too (`--refit FILE`: refit saved rows without measuring). Results: bench/results/aggregate.json
(or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def measure(model: str, ks: list[int], rounds: list[int], scale: float, seed: int) -> list[dict]:
    """One row per (round's density, k): the real aggregate of a round that folded k contributions."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from nord.codec import CodecConfig, DeltaEncoder, density_for_round
    from nord.crdt import MergeConfig, Replica
    from nord.crdt.aggregate import Aggregate
    from nord.identity import Identity
    from nord.model import NordLM
    from nord.recipes import get_config

    torch.manual_seed(seed)
    net = NordLM(get_config(model))
    spec = net.param_spec()
    base = {k: p.detach().clone() for k, p in net.named_parameters()}
    params = sum(t.numel() for t in base.values())
    authority = Identity.from_private_bytes(bytes([1]) * 32)

    def replica() -> Replica:
        return Replica(
            run_id="agg", spec=spec, base=base, merge=MergeConfig(), authorities=[authority.public_key]
        )

    base_hash = replica().base_hash
    rows = []
    for rnd in rounds:
        density = density_for_round(CodecConfig(), rnd)
        codec = CodecConfig(density=density, warmup_rounds=0)  # this round's density, encoded at round 0
        envelopes = []
        for i in tqdm(range(max(ks)), desc=f"encode round {rnd} (d = {density:.4f})"):
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            delta = {k: torch.randn(s, generator=gen) * scale for k, s in spec.items()}
            key = Identity.from_private_bytes((i + 1000).to_bytes(4, "big") * 8)
            envelopes.append(
                DeltaEncoder(codec, spec).encode(
                    delta, run_id="agg", round=0, base_hash=base_hash, identity=key
                )
            )
        for k in tqdm(ks, desc=f"seal round {rnd}"):
            rep = replica()
            for env in envelopes[:k]:
                rep.add(env)
            rep.seal(authority)
            seal, window, before, after = rep.aggregate_parts()
            t = time.process_time()
            agg = Aggregate.build(seal, window, before, after)
            build_s = time.process_time() - t
            wire = len(agg.to_bytes())
            changed = sum(
                int(np.count_nonzero(before[n].numpy().view(np.uint32) != after[n].numpy().view(np.uint32)))
                for n in after
            )
            bitmap = sum(len(b) for b, _ in agg.tensors.values())
            xor = sum(len(x) for _, x in agg.tensors.values())
            rows.append(
                {
                    "model": model,
                    "params": params,
                    "round": rnd,
                    "density": density,
                    "k": k,
                    "bytes": wire,
                    "bitmap_bytes": bitmap,
                    "xor_bytes": xor,
                    "other_bytes": wire - bitmap - xor,
                    "changed": changed,
                    "changed_fraction": changed / params,
                    "union_fraction": 1 - (1 - density) ** k,
                    "xor_bytes_per_changed": xor / max(1, changed),
                    "bytes_per_changed": wire / max(1, changed),
                    "bits_per_param": 8 * wire / params,
                    "envelopes_bytes": sum(e.nbytes for e in envelopes[:k]),
                    "build_cpu_s": build_s,
                }
            )
            tqdm.write(
                f"round {rnd} k {k}: {wire:,} B, changed {changed / params:.2%}, "
                f"{xor / max(1, changed):.2f} B/changed, envelopes {rows[-1]['envelopes_bytes']:,} B"
            )
        del envelopes
    return rows


def binary_entropy(f: float) -> float:
    return 0.0 if f <= 0 or f >= 1 else -(f * math.log2(f) + (1 - f) * math.log2(1 - f))


def fit(rows: list[dict]) -> dict:
    """bytes ≈ a + b·k + c·params·H(f)/8 + e·params·f, f = 1 − (1 − d)^k (H: binary entropy, the bitmap's
    information; e: XOR bytes per changed value). a + b·k (the seal and the window: ids and dots) is a
    least-squares line through the rows' bytes besides the tensors; c and e minimise the relative error
    of the tensors' bytes. Returns the constants and each row's relative error."""
    import numpy as np

    k = np.array([r["k"] for r in rows], dtype=np.float64)
    line = np.stack([np.ones_like(k), k], axis=1)
    (a, b), *_ = np.linalg.lstsq(
        line, np.array([r["other_bytes"] for r in rows], dtype=np.float64), rcond=None
    )
    x = np.array(
        [
            [r["params"] * binary_entropy(r["union_fraction"]) / 8, r["params"] * r["union_fraction"]]
            for r in rows
        ]
    )
    y = np.array([r["bitmap_bytes"] + r["xor_bytes"] for r in rows], dtype=np.float64)
    (c, e), *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    predicted = a + b * k + x @ np.array([c, e])
    errors = [float(p / r["bytes"] - 1) for p, r in zip(predicted, rows, strict=True)]
    names = ["fixed_bytes", "bytes_per_contribution", "bitmap_per_entropy_byte", "bytes_per_changed"]
    return {"coef": dict(zip(names, map(float, (a, b, c, e)), strict=True)), "relative_errors": errors}


def table(rows: list[dict], errors: list[float]) -> str:
    head = (
        "| round | density | k | aggregate B | bits/param | changed | union 1−(1−d)^k | bitmap B | XOR B | "
        "XOR B/changed | k envelopes B | aggregate / envelopes | fit error |"
    )
    lines = [head, "|" + "--:|" * (head.count("|") - 1)]
    for r, err in zip(rows, errors, strict=True):
        lines.append(
            f"| {r['round']} | {r['density']:.4f} | {r['k']} | {r['bytes']:,} | {r['bits_per_param']:.3f} | "
            f"{r['changed_fraction']:.2%} | {r['union_fraction']:.2%} | {r['bitmap_bytes']:,} | "
            f"{r['xor_bytes']:,} | {r['xor_bytes_per_changed']:.2f} | {r['envelopes_bytes']:,} | "
            f"{r['bytes'] / r['envelopes_bytes']:.3f} | {100 * err:+.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small", help="recipe (nord.recipes)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 10, 30, 100, 300], help="contributions")
    parser.add_argument("--rounds", type=int, nargs="+", default=[0, 8], help="warm-up rounds: their density")
    parser.add_argument(
        "--round0-max-k", type=int, default=300, help="largest k at warm-up densities > final"
    )
    parser.add_argument("--scale", type=float, default=1e-3, help="σ of the random deltas")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--out", type=Path, default=RESULTS / "aggregate.json")
    parser.add_argument("--refit", type=Path, help="refit the rows saved in this JSON (no measuring)")
    args = parser.parse_args()
    if args.refit:
        saved = json.loads(args.refit.read_text())
        saved["fit"] = fit(saved["rows"])
        print(table(saved["rows"], saved["fit"]["relative_errors"]))
        print("fit:", json.dumps(saved["fit"]["coef"]))
        args.refit.write_text(json.dumps(saved, indent=1) + "\n")
        return

    import torch

    sys.path.insert(0, str(ROOT))
    from nord.codec import CodecConfig

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for rnd in args.rounds:
        warmup = rnd < CodecConfig().warmup_rounds
        ks = [k for k in args.ks if not warmup or k <= args.round0_max_k]
        rows += measure(args.model, ks, [rnd], args.scale, args.seed)
    fitted = fit(rows)
    print(table(rows, fitted["relative_errors"]))
    print("fit:", json.dumps(fitted["coef"]))
    out = {
        "command": "python bench/aggregate.py " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "scale": args.scale,
        "rows": rows,
        "fit": fitted,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
