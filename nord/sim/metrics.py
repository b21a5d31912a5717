"""What a simulation reports: one JSON-able summary, and PNGs beside it.

Definitions (docs/simulation.md): t50/t99 — seconds from a contribution's publication until 50% / 99%
of the honest volunteers online then hold it; round duration — between consecutive seals; seal
latency — from a seal until 50% / 99% of the online volunteers adopted it; useful-compute share —
training time that ended in a sealed contribution over the volunteers' online time; staleness — seal
round minus contribution round of each folded contribution.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from nord.sim import costs
from nord.sim.world import COORDINATOR, SealInfo, World


def _stats(values, scale: float = 1.0) -> dict[str, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64) * scale
    if not len(v):
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan, "max": math.nan}
    finite = v[np.isfinite(v)]
    mean = float(finite.mean()) if len(finite) == len(v) else math.inf
    return {
        "mean": mean,
        "p50": float(np.quantile(v, 0.5, method="higher")),
        "p99": float(np.quantile(v, 0.99, method="higher")),
        "max": float(v.max()),
    }


def summarize(world: World, authority, wall_s: float) -> dict:
    """The simulation's outputs as plain numbers (inf: never reached)."""
    w, cfg = world, world.cfg
    end = w.env.now
    world.retire_before(10**9)
    vols = range(w.first_volunteer, w.n_nodes)
    public_vols = [i for i in vols if not w.client[i]]
    seal_times = [w.seals[r].at for r in sorted(w.seals)]
    durations = np.diff([0.0, *seal_times])
    latencies50, latencies99 = [], []
    for r, seal in sorted(w.seals.items()):
        online = [i for i in vols if w.was_online(i, seal.at)]
        times = [w.adopted.get(r, {}).get(i, math.inf) - seal.at for i in online]
        if times:
            latencies50.append(float(np.quantile(times, 0.5, method="higher")))
            latencies99.append(float(np.quantile(times, 0.99, method="higher")))
    online_s = sum(max(0.0, min(b, end) - a) for v in w.volunteers for a, b in v.sessions if a < end)
    honest = [c for c in w.retired if c["kind"] == ""]
    total = len(w.retired)
    folded = len(authority.staleness)
    rejected_validation = sum(1 for _ in w.rejected)
    n_rounds = max(1, len(w.seals))
    coord_in = w.net.bytes_down[COORDINATOR]
    return {
        "config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
        "sizes": w.sizes.__dict__,
        "sim_seconds": end,
        "wall_seconds": wall_s,
        "sealed_rounds": len(w.seals),
        "t50_s": _stats([c["t50"] for c in honest]),
        "t99_s": _stats([c["t99"] for c in honest]),
        "round_s": _stats(durations),
        "seal_latency_50_s": _stats(latencies50),
        "seal_latency_99_s": _stats(latencies99),
        "volunteer_up_MB": _stats([w.net.bytes_up[i] for i in vols], 1e-6),
        "volunteer_down_MB": _stats([w.net.bytes_down[i] for i in vols], 1e-6),
        "public_volunteer_up_MB": _stats([w.net.bytes_up[i] for i in public_vols], 1e-6),
        "relay_up_MB": _stats([w.net.bytes_up[i] for i in range(1, w.first_volunteer)], 1e-6),
        "coordinator_in_MB_per_round": coord_in / n_rounds * 1e-6,
        "coordinator_out_MB_per_round": w.net.bytes_up[COORDINATOR] / n_rounds * 1e-6,
        "coordinator_in_Mbps": coord_in * 8 / max(end, 1e-9) * 1e-6,
        "coordinator_cpu_s_per_round": (authority.score_s + w.net.cpu_s[COORDINATOR]) / n_rounds,
        "useful_compute_share": w.useful_train_s / online_s if online_s else math.nan,
        "staleness": {str(k): authority.staleness.count(k) for k in sorted(set(authority.staleness))},
        "contributions": {
            "published": total,
            "folded": folded,
            "rejected_by_validation": rejected_validation,
            "never_folded": total - folded - rejected_validation,
        },
        "dht": {"failed_gets": w.dht.failed_gets, "MB_read": w.dht.bytes_read * 1e-6},
        "aggregate_dht": {
            "failed_gets": w.aggregate_dht.failed_gets,
            "MB_read": w.aggregate_dht.bytes_read * 1e-6,
        },
        "aggregate_MB_per_seal": _stats([aggregate_bytes(s, w.sizes.params) for s in w.seals.values()], 1e-6),
        "counters": dict(sorted(w.counters.items())),
        "per_contribution": w.retired,
        "per_round": [
            {
                "round": r,
                "sealed_at": s.at,
                "contributions": sum(map(len, s.listed.values())),
                "aggregate_bytes": aggregate_bytes(s, w.sizes.params),
                "reason": s.reason,
            }
            for r, s in sorted(w.seals.items())
        ],
    }


def aggregate_bytes(seal: SealInfo, params: int) -> int:
    """The modelled wire size of a seal's aggregate (what `--adopt aggregate` volunteers download)."""
    return costs.aggregate_bytes({q: len(c) for q, c in seal.listed.items() if c}, params)


def plot(summary: dict, out_json: Path) -> list[Path]:
    """PNGs beside `out_json`: spread CDF, round durations, bytes per volunteer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = out_json.with_suffix("")
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("t50", "50% hold"), ("t99", "99% hold")):
        v = np.sort(
            [c[key] for c in summary["per_contribution"] if c["kind"] == "" and math.isfinite(c[key])]
        )
        if len(v):
            ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)
    ax.set_xlabel("seconds after publication")
    ax.set_ylabel("share of contributions")
    ax.set_title(f"spread, N = {summary['config']['peers']}")
    ax.legend()
    paths.append(stem.with_name(stem.name + "-spread.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = summary["per_round"]
    ax.plot([r["round"] for r in rounds], np.diff([0.0] + [r["sealed_at"] for r in rounds]), marker=".")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds since the previous seal")
    ax.set_title(f"round duration, N = {summary['config']['peers']}")
    paths.append(stem.with_name(stem.name + "-rounds.png"))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths
