"""The worker's local training on its parameter shards: the model, optimizer and delta encoder.

    W ← sealed weights of the open round r
    H inner steps (nord.train.train_steps) on this worker's data shard
    Δ ← W_local − W on its parameter shards; envelope ← DeltaEncoder.encode(Δ) (error feedback keeps
    what was not sent)

Which parameter shards (`choose_plan`): --shards, else those of a previous session (its optimizer state
is theirs), else the largest set of the open round's least-covered shards that fits this device.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import torch

from nord.codec import DeltaEncoder
from nord.config import RunConfig
from nord.errors import CodecError, ConfigError, NordError
from nord.identity import Identity
from nord.memory import device_memory_bytes
from nord.model import NordLM
from nord.shards import (
    ShardPlan,
    contribution_delta,
    freeze_outside,
    parse_shards,
    plan_for,
    plan_shards,
    trained_names,
    worker_sizing,
)
from nord.train import cpu_bf16_default, make_optimizer, train_steps

log = logging.getLogger(__name__)


class OutOfMemory(NordError):
    """The run's model and batch do not fit this device."""


def choose_plan(
    run: RunConfig,
    device: torch.device,
    *,
    override: str | None,
    saved_shards: list[int] | None,
    coverage: Callable[[], dict[int, int]],
    tie_break: str,
) -> ShardPlan:
    """--shards (`override`), else the shards of a previous session, else the least-covered shards of the
    open round (`coverage()`, asked only then) that fit this device's memory."""
    budget = device_memory_bytes(device)
    sizing = worker_sizing(run.train.batch_size, run.train.seq_len, device)
    chosen = parse_shards(override, run.shards) if override else tuple(saved_shards or ())
    if chosen:
        plan = plan_for(run.model, run.shards, chosen, budget_bytes=budget, **sizing)
    else:
        plan = plan_shards(
            run.model, run.shards, coverage(), budget_bytes=budget, tie_break=tie_break, **sizing
        )
    log.info("%s", plan.describe(budget))
    return plan


class LocalTrainer:
    """The model, optimizer and encoder of one worker's shards, resumed from `saved` (worker.pt) if given."""

    def __init__(
        self,
        run: RunConfig,
        spec: dict[str, tuple[int, ...]],
        plan: ShardPlan,
        device: torch.device,
        *,
        corpus,
        data_shard: tuple[int, int],
        seed_key: str,
        saved: dict | None,
        saved_from: str,
        progress: bool,
    ) -> None:
        self.run, self.plan, self.device, self.progress = run, plan, device, progress
        self.trained = trained_names(spec, run.model, run.shards, plan.shards)
        self.model = NordLM(run.model, activation_checkpointing=plan.activation_checkpointing).to(device)
        freeze_outside(self.model, self.trained)  # no gradients, no optimizer state outside our shards
        self.optimizer = make_optimizer(self.model, run.train, device, eight_bit=device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.encoder = DeltaEncoder(run.codec, spec)
        self.inner_steps_done = 0
        if saved is not None:
            try:
                self.encoder.load_state_dict(saved["residual"])
                if saved.get("optimizer"):
                    self.optimizer.load_state_dict(saved["optimizer"])
            except (CodecError, ValueError, KeyError) as e:
                raise ConfigError(f"{saved_from} does not fit this run ({e}); delete it") from None
            self.inner_steps_done = int(saved.get("inner_steps_done", 0))
        seed_material = hashlib.sha256(f"{run.train.seed}:{seed_key}".encode()).digest()
        seed = (int.from_bytes(seed_material[:4], "big") + self.inner_steps_done) % 2**32
        cfg = run.train
        self.batches = corpus.batches("train", cfg.batch_size, cfg.seq_len, seed=seed, shard=data_shard)

    def state_dict(self) -> dict:
        """What worker.pt keeps of the training (the worker adds its last envelope)."""
        return {
            "residual": self.encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "inner_steps_done": self.inner_steps_done,
            "shards": list(self.plan.shards),
        }

    def contribution(self, base: dict, *, rnd: int, base_hash: str, identity: Identity):
        """H inner steps from the sealed weights `base`; returns (the signed envelope of our shards' delta,
        the training stats)."""
        self.model.load_state_dict({k: v.to(self.device) for k, v in base.items()}, strict=True)
        stats = self._train()
        delta = contribution_delta(self.model, base, self.trained)  # our shards' tensors only
        envelope = self.encoder.encode(
            delta, run_id=self.run.run_id, round=rnd, base_hash=base_hash, identity=identity
        )
        return envelope, stats

    def _train(self):
        cfg = self.run.train

        def lr_at(step: int) -> float:
            return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))

        try:
            stats = train_steps(
                self.model,
                self.optimizer,
                self.batches,
                cfg.inner_steps,
                scaler=self.scaler,
                grad_clip=cfg.grad_clip,
                lr_fn=lr_at,
                start_step=self.inner_steps_done,
                device=self.device,
                progress=self.progress,
                cpu_bf16=cpu_bf16_default(),  # bf16 where the CPU computes it natively (nord.train)
            )
        except torch.cuda.OutOfMemoryError:
            raise OutOfMemory(self._oom_message()) from None
        self.inner_steps_done += cfg.inner_steps
        return stats

    def _oom_message(self) -> str:
        props = torch.cuda.get_device_properties(self.device)
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (
            f"out of GPU memory: this run's model ({params:.0f}M parameters, "
            f"batch {self.run.train.batch_size}×{self.run.train.seq_len}) does not fit {props.name} "
            f"({props.total_memory / 2**30:.1f} GiB); "
            "join a run with a smaller recipe, free the GPU, or use --device cpu"
        )
