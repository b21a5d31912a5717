"""The simulation's inputs: one frozen config, and the distributions each peer's traits are drawn from.

Every distribution names its source in docs/simulation.md. Bandwidths and latencies are log-normal
(median, sigma of the log), session lengths exponential with a hard cap, compute speed a fixed
throughput per device kind. All draws come from one `random.Random(seed)`, so a seed fixes the run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from nord.errors import ConfigError


@dataclass(frozen=True)
class LinkClass:
    """A kind of internet connection: log-normal up/down bandwidth (Mbit/s medians, sigma of the log)."""

    down_mbps: float
    up_mbps: float
    sigma: float


# Medians: residential from fixed-broadband speed-test medians (asymmetric), notebooks from GCP-hosted
# Colab/Kaggle VMs, datacenter a 1 Gbit/s VPS port. See docs/simulation.md.
LINKS = {
    "residential": LinkClass(down_mbps=100.0, up_mbps=20.0, sigma=0.8),
    "notebook": LinkClass(down_mbps=500.0, up_mbps=300.0, sigma=0.5),
    "datacenter": LinkClass(down_mbps=1000.0, up_mbps=1000.0, sigma=0.2),
}

# Dense fp16 tensor-core peak, TFLOP/s (vendor data sheets); "cpu" is the measured 2-core rate below.
PEAK_TFLOPS = {"t4": 65.0, "p100": 18.7, "a100": 312.0}
CPU_TOKENS_PER_S_SMALL = 789.0  # docs/benchmarks/t4_fit.md, `small` whole model, fp32, 2 cores
SMALL_PARAMS = 13.2e6

# Which device and link each population of volunteers has, and how its sessions end.
POPULATIONS = ("colab", "kaggle", "home", "server")
ADOPT = ("contributions", "aggregate", "auto")
SYNC_PUSH = ("all", "gatherers")


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """Everything one simulation depends on (a seed makes it deterministic)."""

    peers: int = 1000  # volunteers (the coordinator and relays come on top)
    rounds: int = 50  # sealed rounds to simulate
    seed: int = 0
    model: str = "small"  # recipe: parameter count and real envelope sizes
    inner_steps: int = 20  # H (TrainConfig.inner_steps)
    tokens_per_step: int = 8 * 256  # batch_size × seq_len (TrainConfig defaults)
    client_share: float = 0.8  # volunteers in client mode (behind NAT: nobody can dial them)
    relays: int = 0  # public peers that only serve gossip (datacenter links), besides the coordinator
    mix: tuple[tuple[str, float], ...] = (("colab", 0.4), ("kaggle", 0.3), ("home", 0.2), ("server", 0.1))
    rtt_ms: float = 80.0  # median round-trip time between two peers
    rtt_sigma: float = 0.6
    mfu: float = 0.15  # achieved share of a GPU's peak in training (estimate, see docs)
    straggler_share: float = 0.05  # volunteers that train this many times slower ...
    straggler_factor: float = 4.0
    colab_mean_h: float = 6.0  # Colab sessions: exponential preemption, capped at 12 h
    kaggle_quota_h: float = 30.0  # Kaggle: GPU hours a week; sessions capped at 12 h
    home_mean_h: float = 24.0  # home and server volunteers: exponential sessions
    offline_mean_h: float = 0.5  # gap before a preempted volunteer rejoins with its state
    poison_share: float = 0.0  # hostile volunteers sending contributions that fail validation
    withhold_share: float = 0.0  # hostile public volunteers that accept pushes but serve nothing
    equivocate_share: float = 0.0  # hostile volunteers sending two payloads for one round
    quorum: int = 3  # RoundConfig.quorum
    deadline_s: float = 300.0  # RoundConfig.deadline_s
    max_staleness: int = 2  # MergeConfig.max_staleness
    poll_s: float = 1.0  # worker anti-entropy interval (`nord-node join --poll-s`)
    fanout: int = 2  # sync partners per worker pass (coordinator: 1 every 5 s)
    ban_after: int = 3  # ValidationConfig.ban_after
    coordinator_cores: int = 1  # contributions validated at once
    cost_scale: float = 1.0  # multiplies the fitted validation and merge CPU times
    adopt: str = "contributions"  # how a volunteer adopts a seal: "contributions", "aggregate" or "auto"
    sync_push: str = "gatherers"  # whom a sync pushes contributions: "gatherers" (since 4968361) or "all"
    extra: dict = field(default_factory=dict, compare=False)  # free-form note kept in the output

    def __post_init__(self) -> None:
        if self.peers < 2:
            raise ConfigError(f"--peers must be >= 2, got {self.peers}")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        for name in ("client_share", "straggler_share", "poison_share", "withhold_share", "equivocate_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.poison_share + self.withhold_share + self.equivocate_share > 1.0:
            raise ConfigError("the hostile shares add up to more than 1")
        positive = ("inner_steps", "tokens_per_step", "rtt_ms", "mfu", "straggler_factor", "poll_s")
        positive += ("colab_mean_h", "kaggle_quota_h", "home_mean_h", "offline_mean_h", "deadline_s")
        positive += ("quorum", "fanout", "ban_after", "coordinator_cores", "cost_scale")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.relays < 0 or self.max_staleness < 0:
            raise ConfigError("--relays and --max-staleness must be >= 0")
        if self.adopt not in ADOPT:
            raise ConfigError(f"--adopt must be one of {', '.join(ADOPT)}, got {self.adopt!r}")
        if self.sync_push not in SYNC_PUSH:
            raise ConfigError(f"--sync-push must be one of {', '.join(SYNC_PUSH)}, got {self.sync_push!r}")
        names = [n for n, _ in self.mix]
        if (
            set(names) - set(POPULATIONS)
            or any(w < 0 for _, w in self.mix)
            or sum(w for _, w in self.mix) <= 0
        ):
            raise ConfigError(f"--mix takes NAME=WEIGHT for NAME in {', '.join(POPULATIONS)}, weights >= 0")


@dataclass(frozen=True, kw_only=True)
class Traits:
    """One volunteer, drawn once."""

    population: str
    client_mode: bool
    down_bps: float  # bytes per second
    up_bps: float
    latency_s: float  # its share of a one-way delay (see `latency`)
    device: str
    train_s: float  # seconds for H inner steps
    hostile: str  # "", "poison", "withhold", "equivocate"
    sessions: tuple[tuple[float, float], ...]  # (online from, until) in seconds


def link(rng: random.Random, kind: str) -> tuple[float, float]:
    """(down, up) in bytes per second for a link of class `kind`."""
    c = LINKS[kind]
    scale = rng.lognormvariate(0.0, c.sigma)  # one draw: a fast line is fast both ways
    return c.down_mbps * 1e6 / 8 * scale, c.up_mbps * 1e6 / 8 * scale


def latency(rng: random.Random, cfg: SimConfig) -> float:
    """One peer's share of a one-way delay: two peers' shares add up to half their RTT (median)."""
    return cfg.rtt_ms / 4e3 * rng.lognormvariate(0.0, cfg.rtt_sigma)


def tokens_per_s(device: str, params: float, mfu: float) -> float:
    """Training throughput: mfu × peak / (6 × params) on a GPU; the measured CPU rate scaled by size."""
    if device == "cpu":
        return CPU_TOKENS_PER_S_SMALL * SMALL_PARAMS / params
    return mfu * PEAK_TFLOPS[device] * 1e12 / (6.0 * params)


def sessions(
    rng: random.Random, population: str, cfg: SimConfig, horizon_s: float
) -> list[tuple[float, float]]:
    """Online intervals until `horizon_s`: capped sessions separated by exponential offline gaps."""
    cap = 12 * 3600.0
    mean = {"colab": cfg.colab_mean_h, "kaggle": cfg.kaggle_quota_h / 3, "home": cfg.home_mean_h}
    mean_s = mean.get(population, cfg.home_mean_h) * 3600.0
    quota = cfg.kaggle_quota_h * 3600.0 if population == "kaggle" else math.inf
    out, t, used = [], 0.0, 0.0
    while t < horizon_s and used < quota:
        length = min(rng.expovariate(1.0 / mean_s), quota - used)
        if population in ("colab", "kaggle"):
            length = min(length, cap)
        out.append((t, t + length))
        used += length
        t += length + rng.expovariate(1.0 / (cfg.offline_mean_h * 3600.0))
    return out


DEVICE = {"colab": "t4", "kaggle": "p100", "home": "t4", "server": "a100"}
LINK_OF = {"colab": "notebook", "kaggle": "notebook", "home": "residential", "server": "datacenter"}


def draw_volunteers(cfg: SimConfig, params: float, horizon_s: float) -> list[Traits]:
    """The volunteers' traits; hostile roles and client mode are assigned to exact shares, at random."""
    rng = random.Random(cfg.seed)
    names, weights = zip(*cfg.mix, strict=True)
    n = cfg.peers
    pops = rng.choices(names, weights=weights, k=n)
    order = list(range(n))
    rng.shuffle(order)
    n_client = round(cfg.client_share * n)
    client = set(order[:n_client])
    # withholding needs a public address (nobody could ask a client-mode peer anyway)
    public = [i for i in order if i not in client]
    withhold = set(public[: round(cfg.withhold_share * n)])
    rest = [i for i in order if i not in withhold]
    poison = set(rest[: round(cfg.poison_share * n)])
    equiv = set(rest[len(poison) : len(poison) + round(cfg.equivocate_share * n)])
    stragglers = set(rng.sample(range(n), round(cfg.straggler_share * n)))
    out = []
    for i in range(n):
        down, up = link(rng, LINK_OF[pops[i]])
        device = DEVICE[pops[i]]
        train_s = cfg.inner_steps * cfg.tokens_per_step / tokens_per_s(device, params, cfg.mfu)
        hostile = (
            "withhold" if i in withhold else "poison" if i in poison else "equivocate" if i in equiv else ""
        )
        out.append(
            Traits(
                population=pops[i],
                client_mode=i in client,
                down_bps=down,
                up_bps=up,
                latency_s=latency(rng, cfg),
                device=device,
                train_s=train_s * (cfg.straggler_factor if i in stragglers else 1.0),
                hostile=hostile,
                sessions=tuple(sessions(rng, pops[i], cfg, horizon_s)),
            )
        )
    return out
