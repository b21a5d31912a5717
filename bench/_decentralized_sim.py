"""One training setup of `bench/decentralized.py`: centralized, dense DiLoCo peers, or Nord peers.

All K peers run in this one process and call exactly what a worker calls: `nord.train.train_steps`
for H inner AdamW steps on their disjoint shard, then the pseudo-gradient Δ_i = W_i − W goes through

    DeltaEncoder.encode → Envelope.to_bytes() → decode_envelope → Replica.add → Replica.seal → weights

(W ← W + η · S/(C + c0), the damped sparse-aware mean over the peers that sent each coordinate; c0 = 0
is the plain mean S/C). The encoder keeps values at its round's density (`density_for_round`: the
codec's warm-up schedule), so bytes are counted round by round. A second replica
receives the same bytes in the reverse order and must accept every seal (it recomputes the weights
hash), so every Nord round is also a check that replicas agree bit for bit.

Merge variants the library has no switch for are computed here, labelled bench-side, from the same
decoded envelopes summed in a `FixedPointAccumulator` (exact int64 sums S and counts C):

    divk     W ← W + η · S / K                 (dense ÷K mean: the weight-dilution ablation)
    damped   W ← W + η · S / (C + c0)          (damped sparse-aware mean: MergeConfig.damping)

Dense baselines (DiLoCo) average fp32 Δ_i exactly:

    plain     W ← W + mean_i Δ_i
    nesterov  g = −mean_i Δ_i;  b ← μ b + g;  W ← W − η (g + μ b)      (η = 0.7, μ = 0.9)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass

import torch

from nord.codec import CodecConfig, DeltaEncoder, decode_envelope
from nord.config import TrainConfig
from nord.crdt import FixedPointAccumulator, MergeConfig, Replica
from nord.data import load_corpus
from nord.errors import ConfigError
from nord.identity import Identity
from nord.model import NordLM
from nord.recipes import get_config
from nord.train import cosine_lr, evaluate, make_optimizer, train_steps

log = logging.getLogger("bench.decentralized")

RUN_ID = "bench-decentralized"
KINDS = ("central", "dense", "nord")
DENSE_OUTER = ("plain", "nesterov")
MEANS = ("sparse", "median", "divk", "damped")  # median/damped: MergeConfig switches; divk bench-side


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One row of the benchmark."""

    name: str
    kind: str  # central | dense | nord
    outer: str = "plain"  # dense only: plain | nesterov
    outer_lr: float = 1.0  # η of the outer step (dense nesterov: 0.7)
    momentum: float = 0.9  # dense nesterov only
    density: float = 1.0  # nord: kept fraction per 4096-chunk
    ef_decay: float = 1.0  # nord: CodecConfig.ef_decay (0 = no error feedback)
    mean: str = "sparse"  # nord: sparse | median | divk | damped
    c0: float = 1.0  # nord damped: S / (C + c0)
    warmup_rounds: int = 0  # nord: CodecConfig.warmup_rounds (density warm-up; 0 = none)
    warmup_density: float = 0.25  # nord: CodecConfig.warmup_density (round 0's density)
    mask: str = "topk"  # nord: CodecConfig.mask ("shared": a random-k mask shared by all peers)
    value_bits: int = 4  # nord: CodecConfig.value_bits (4 = NF4, 2 = sign + one magnitude bit)
    block: int = 1  # nord: CodecConfig.block (top-k over blocks of this many neighbouring values)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"setup kind must be one of {KINDS}, got {self.kind!r}")
        if self.outer not in DENSE_OUTER:
            raise ConfigError(f"outer must be one of {DENSE_OUTER}, got {self.outer!r}")
        if self.mean not in MEANS:
            raise ConfigError(f"mean must be one of {MEANS}, got {self.mean!r}")

    def codec(self) -> CodecConfig:
        """This Nord setup's codec."""
        return CodecConfig(density=self.density, ef_decay=self.ef_decay, warmup_rounds=self.warmup_rounds,
                           warmup_density=self.warmup_density, value_bits=self.value_bits, block=self.block,
                           mask=self.mask)  # fmt: skip

    @property
    def bench_side(self) -> bool:
        """True where the merge is computed by this bench, not by `Replica` (no library switch yet)."""
        return self.kind == "nord" and self.mean == "divk"


@dataclass(frozen=True, kw_only=True)
class RunShape:
    """What every setup of one benchmark run shares (equal tokens: central batch = K · peer batch)."""

    corpus_dir: str
    model: str = "tiny"
    peers: int = 4
    rounds: int = 20
    inner_steps: int = 8  # H
    batch_size: int = 4  # per peer
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 20
    eval_every: int = 2  # rounds between validation points
    eval_windows: int = 12  # windows per intermediate validation
    final_windows: int | None = None  # windows of the final validation (None: the whole split)
    device: str = "cpu"
    progress: str | None = None  # JSONL: a line per validation point (a stopped run still leaves its curve)


def _flat_params(model: NordLM) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in model.named_parameters()}


@torch.no_grad()
def _load(model: NordLM, weights: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.copy_(weights[name].to(p.device))


class _Merger:
    """Turns the peers' weights after a round into the next global weights; counts bytes sent."""

    def __init__(self, setup: Setup, spec: dict[str, tuple[int, ...]], w0: dict[str, torch.Tensor], k: int):
        self.setup, self.spec, self.k = setup, spec, k
        self.weights = {n: t.clone() for n, t in w0.items()}
        self.params = sum(math.prod(s) for s in spec.values())
        self.bytes_per_round: list[float] = []  # mean over peers, one per round
        self.verified_rounds = 0
        if setup.kind == "dense":
            self.momentum = {n: torch.zeros_like(t) for n, t in w0.items()}
        if setup.kind == "nord":
            self.codec = setup.codec()
            self.encoders = [DeltaEncoder(self.codec, spec) for _ in range(k)]
            self.identities = [Identity.generate() for _ in range(k)]
            self.authority = Identity.generate()
            merge_lr = setup.outer_lr if not setup.bench_side else 1.0
            self.merge = MergeConfig(
                outer_lr=merge_lr,
                median_norm_clip=setup.mean == "median",
                damping=setup.c0 if setup.mean == "damped" else 0.0,
            )
            self.replicas = [
                Replica(run_id=RUN_ID, spec=spec, base=w0, merge=self.merge,
                        authorities=[self.authority.public_key])
                for _ in range(2)
            ]  # fmt: skip

    def step(self, peer_weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        deltas = [{n: w[n] - self.weights[n] for n in self.spec} for w in peer_weights]
        if self.setup.kind == "dense":
            self._dense(deltas)
        else:
            self._nord(deltas)
        return self.weights

    def _dense(self, deltas: list[dict[str, torch.Tensor]]) -> None:
        s = self.setup
        self.bytes_per_round.append(4.0 * self.params)  # fp32 all-reduce payload per peer
        for n in self.spec:
            mean = torch.stack([d[n] for d in deltas]).double().mean(0).float()
            if s.outer == "plain":
                self.weights[n] = self.weights[n] + s.outer_lr * mean
            else:
                g = -mean
                buf = self.momentum[n].mul_(s.momentum).add_(g)
                self.weights[n] = self.weights[n] - s.outer_lr * (g + s.momentum * buf)

    def _nord(self, deltas: list[dict[str, torch.Tensor]]) -> None:
        primary, mirror = self.replicas
        envelopes, sent = [], []
        for encoder, identity, delta in zip(self.encoders, self.identities, deltas, strict=True):
            env = encoder.encode(
                delta, run_id=RUN_ID, round=primary.round, base_hash=primary.base_hash, identity=identity
            )
            data = env.to_bytes()  # what goes on the wire
            sent.append(len(data))
            envelopes.append(decode_envelope(data, self.spec, run_id=RUN_ID, max_bytes=2**31))
        self.bytes_per_round.append(sum(sent) / len(sent))
        if self.setup.bench_side:
            self.weights = self._bench_side_mean(envelopes)
            return
        for env in envelopes:
            primary.add(env)
        for env in reversed(envelopes):
            mirror.add(decode_envelope(env.to_bytes(), self.spec, run_id=RUN_ID, max_bytes=2**31))
        seal = primary.seal(self.authority)
        if not mirror.apply_seal(seal) or mirror.base_hash != primary.base_hash:
            raise RuntimeError(f"replicas disagree at round {seal.round}")
        self.verified_rounds += 1
        for replica in self.replicas:
            replica.compact()  # keep memory bounded: folded payloads are dropped
        self.weights = primary.weights(include_open_round=False)

    def _bench_side_mean(self, envelopes) -> dict[str, torch.Tensor]:
        """BENCH-SIDE merge (no library switch): W + η·S/K, the weight-dilution ablation."""
        acc = FixedPointAccumulator(self.spec, self.merge)
        for env in envelopes:
            acc.add(env.delta())
        s, scale = self.setup, 2.0**-self.merge.frac_bits
        out = {}
        for n, w in self.weights.items():
            if n not in acc.sums:
                out[n] = w.clone()
                continue
            total = acc.sums[n].to(torch.float64) * scale
            out[n] = (w.reshape(-1).double() + s.outer_lr * total / self.k).float().reshape(w.shape)
        return out


def _append_line(path: str, point: dict) -> None:
    """One JSON line, written in one call so that the lines of parallel runs stay whole."""
    with open(path, "a") as f:
        f.write(json.dumps(point) + "\n")


def _validate(model, corpus, shape: RunShape, windows: int | None) -> dict[str, float]:
    r = evaluate(model, corpus, seq_len=shape.seq_len, max_batches=windows, device=shape.device)
    return {"loss": r.loss, "ppl": r.ppl, "bpb": r.bits_per_byte}


def run_setup(setup: Setup, seed: int, shape: RunShape) -> dict:
    """Train `setup` for `shape.rounds` rounds; return its curve, final validation, bytes and time."""
    torch.manual_seed(seed)
    corpus = load_corpus(shape.corpus_dir)
    cfg = dataclasses.replace(
        get_config(shape.model, vocab_size=corpus.vocab_size), max_seq_len=shape.seq_len
    )
    train_cfg = TrainConfig(batch_size=shape.batch_size, seq_len=shape.seq_len, lr=shape.lr, seed=seed)
    device = torch.device(shape.device)
    total_steps = shape.rounds * shape.inner_steps
    lr_fn = cosine_lr(shape.lr, warmup_steps=shape.warmup, total_steps=total_steps)
    central = setup.kind == "central"
    k = 1 if central else shape.peers
    models = [NordLM(cfg).to(device) for _ in range(k)]
    w0 = _flat_params(models[0])
    for m in models[1:]:
        _load(m, w0)
    optimizers = [make_optimizer(m, train_cfg, device) for m in models]
    batch = shape.batch_size * (shape.peers if central else 1)
    streams = [
        iter(corpus.batches("train", batch, shape.seq_len, seed=seed, shard=(0, 1) if central else (i, k)))
        for i in range(k)
    ]
    merger = None if central else _Merger(setup, models[0].param_spec(), w0, k)
    tokens_per_round = shape.peers * shape.batch_size * shape.seq_len * shape.inner_steps
    first_val = _validate(models[0], corpus, shape, shape.eval_windows)["loss"]
    curve = {"round": [0], "tokens": [0], "val_loss": [first_val]}
    rates, train_loss = [], []
    start = time.perf_counter()
    for rnd in range(shape.rounds):
        stats = [
            train_steps(m, opt, it, shape.inner_steps, grad_clip=train_cfg.grad_clip, lr_fn=lr_fn,
                        start_step=rnd * shape.inner_steps, device=device, progress=False)
            for m, opt, it in zip(models, optimizers, streams, strict=True)
        ]  # fmt: skip
        rates.append(sum(s.firing_rate for s in stats) / k)
        train_loss.append(sum(s.loss for s in stats) / k)
        if merger is not None:
            weights = merger.step([_flat_params(m) for m in models])
            for m in models:
                _load(m, weights)  # inner optimizer state is kept across rounds (DiLoCo)
        if (rnd + 1) % shape.eval_every == 0 or rnd + 1 == shape.rounds:
            curve["round"].append(rnd + 1)
            curve["tokens"].append((rnd + 1) * tokens_per_round)
            curve["val_loss"].append(_validate(models[0], corpus, shape, shape.eval_windows)["loss"])
            log.info("%s seed %d round %d: val %.4f", setup.name, seed, rnd + 1, curve["val_loss"][-1])
            if shape.progress:
                point = {"setup": setup.name, "seed": seed, "round": rnd + 1}
                point["val_loss"] = curve["val_loss"][-1]
                point["bytes_per_peer_total"] = sum(merger.bytes_per_round) if merger else 0.0
                _append_line(shape.progress, point)
    train_seconds = time.perf_counter() - start
    final = _validate(models[0], corpus, shape, shape.final_windows)
    params = sum(p.numel() for p in models[0].parameters())
    bytes_round = (sum(merger.bytes_per_round) / len(merger.bytes_per_round)) if merger else 0.0
    return {
        "setup": dataclasses.asdict(setup),
        "bench_side": setup.bench_side,
        "seed": seed,
        "params": params,
        "tokens": shape.rounds * tokens_per_round,
        "val": final,
        "firing_rate": rates[-1],
        "train_loss": train_loss,
        "firing_rates": rates,
        "curve": curve,
        "bytes_per_peer_round": bytes_round,
        "bytes_per_peer_total": sum(merger.bytes_per_round) if merger else 0.0,
        "bytes_per_peer_by_round": merger.bytes_per_round if merger else [],
        "bytes_per_param_round": bytes_round / params,
        "verified_rounds": merger.verified_rounds if merger else 0,
        "seconds": train_seconds,
    }
