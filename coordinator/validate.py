"""Gauntlet-style validation: score each contribution alone on held-out batches before a round is sealed.

For a contribution Δ on sealed weights W (the round's base):

    W_Δ    = W + η · clip(Δ)                     exactly what the merge applies for a lone contributor
    before = L(W),  after = L(W_Δ)               mean cross-entropy (nats) on the same held-out batches
    reject if Δ has a non-finite value, ‖clip(Δ)‖₂ > max_relative_norm · ‖W‖₂, L(W_Δ) is not finite,
           or after − before > max_loss_increase

The same held-out batches (the first `batches` of the validation split, in order) also give the sealed
round's metrics: validation loss, perplexity and the firing rate of every layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nord.config import RunConfig
from nord.crdt import FixedPointAccumulator
from nord.crdt.accumulator import contribution_norm
from nord.errors import ConfigError
from nord.model import NordLM


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Thresholds of the coordinator's validation (local to the coordinator, not part of the run)."""

    batches: int = 2  # held-out batches scored per contribution
    batch_size: int = 8
    max_loss_increase: float = 0.1  # nats on the held-out batches, applying the contribution alone
    max_relative_norm: float = 0.5  # ‖Δ‖ / ‖W‖ above this is absurd
    ban_after: int = 3  # rejected or revoked contributions before a peer is banned

    def __post_init__(self) -> None:
        if self.batches < 1 or self.batch_size < 1:
            raise ConfigError("validation batches and batch size must be >= 1")
        if not (math.isfinite(self.max_loss_increase) and self.max_loss_increase >= 0):
            raise ConfigError(f"max loss increase must be a finite number >= 0, got {self.max_loss_increase}")
        if not (math.isfinite(self.max_relative_norm) and self.max_relative_norm > 0):
            raise ConfigError(f"max relative norm must be a finite number > 0, got {self.max_relative_norm}")
        if self.ban_after < 1:
            raise ConfigError(f"ban after must be >= 1, got {self.ban_after}")


@dataclass(frozen=True, kw_only=True)
class Verdict:
    accepted: bool
    reason: str | None  # why it was rejected (None when accepted)
    loss_before: float
    loss_after: float | None
    norm: float | None


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    loss: float
    rates: dict[str, float]  # layer name -> firing rate, plus "overall"


class Validator:
    """Holds the model and the held-out batches; scores contributions and measures sealed weights."""

    def __init__(self, run: RunConfig, corpus, cfg: ValidationConfig) -> None:
        self.run, self.cfg = run, cfg
        self.model = NordLM(run.model).eval()
        batches = corpus.batches("val", cfg.batch_size, run.train.seq_len)
        self.batches = [b for _, b in zip(range(cfg.batches), batches, strict=False)]
        if not self.batches:
            raise ConfigError("the validation split is empty: nothing to score contributions on")
        self._base_cache: tuple[str, Evaluation, float] | None = None

    @torch.no_grad()
    def evaluate(self, weights: Mapping[str, torch.Tensor]) -> Evaluation:
        """Mean loss and per-layer firing rates of `weights` on the held-out batches."""
        for name, p in self.model.named_parameters():
            p.copy_(weights[name])
        losses, rates = [], {}
        for x, y in self.batches:
            out = self.model(x, y)
            losses.append(float(out.loss))
            for k, v in out.rates.items():
                rates[k] = rates.get(k, 0.0) + float(v) / len(self.batches)
        return Evaluation(loss=sum(losses) / len(losses), rates=rates)

    def base(self, base_hash: str, weights: Mapping[str, torch.Tensor]) -> tuple[Evaluation, float]:
        """Evaluation and L2 norm of the round's base weights (cached per base hash)."""
        if self._base_cache is None or self._base_cache[0] != base_hash:
            norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in weights.values()))
            self._base_cache = (base_hash, self.evaluate(weights), norm)
        return self._base_cache[1], self._base_cache[2]

    def score(self, envelope, base_hash: str, weights: Mapping[str, torch.Tensor]) -> Verdict:
        """Score `envelope` applied alone on top of `weights` (whose hash is `base_hash`)."""
        before, base_norm = self.base(base_hash, weights)

        def rejected(reason: str, *, loss_after: float | None = None, norm: float | None = None) -> Verdict:
            return Verdict(
                accepted=False, reason=reason, loss_before=before.loss, loss_after=loss_after, norm=norm
            )

        delta = envelope.delta()
        if any(not torch.isfinite(t.values).all() for t in delta.values()):
            return rejected("non-finite values")
        merge = self.run.merge
        norm = contribution_norm(delta, merge) * merge.outer_lr
        if not math.isfinite(norm) or norm > self.cfg.max_relative_norm * base_norm:
            return rejected(
                f"update norm {norm:.3g} is over {self.cfg.max_relative_norm:g} × the weights' norm "
                f"{base_norm:.3g}",
                norm=norm if math.isfinite(norm) else None,
            )
        acc = FixedPointAccumulator({k: tuple(v.shape) for k, v in weights.items()}, merge)
        acc.add(delta)
        after = self.evaluate(acc.apply_update(weights)).loss
        if not math.isfinite(after):
            return rejected("held-out loss is not finite after applying it", norm=norm)
        if after - before.loss > self.cfg.max_loss_increase:
            return rejected(
                f"held-out loss rose by {after - before.loss:.3f} nats "
                f"({before.loss:.3f} → {after:.3f}; limit {self.cfg.max_loss_increase:g})",
                loss_after=after,
                norm=norm,
            )
        return Verdict(accepted=True, reason=None, loss_before=before.loss, loss_after=after, norm=norm)
