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
import os
import platform
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fit", action="store_true", help="fit the CPU and size models to the real code")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.fit:
        out = fit()
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
