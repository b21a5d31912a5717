"""`RunConfig`: everything the peers of one run must agree on, as one JSON document.

The coordinator publishes it; workers fetch it before training. Each section's dataclass lives next to
the code it configures (model, data, codec, merge); this module only composes them and owns the
training-loop settings that belong to no single component.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nord.errors import ConfigError

RUN_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Inner (local) training of one worker between contributions."""

    inner_steps: int = 20  # H: local AdamW steps per contribution (DiLoCo's inner loop)
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("inner_steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """When the authority seals a round."""

    quorum: int = 3  # seal once this many valid contributions arrived ...
    deadline_s: float = 300.0  # ... or this long after the round opened, with at least one
    keep_checkpoints: int = 5  # sealed checkpoints kept on disk by the coordinator

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ConfigError(f"rounds.quorum must be >= 1, got {self.quorum}")
        if not self.deadline_s > 0:
            raise ConfigError(f"rounds.deadline_s must be > 0, got {self.deadline_s}")


def _sections() -> dict[str, type]:
    # Imported here so that `nord.config` stays importable without torch for tools that only read JSON.
    from nord.codec import CodecConfig
    from nord.crdt import MergeConfig
    from nord.data import DataConfig
    from nord.model import ModelConfig
    from nord.shards import ShardConfig

    return {
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "codec": CodecConfig,
        "merge": MergeConfig,
        "rounds": RoundConfig,
        "shards": ShardConfig,
    }


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: its id, the model and every setting peers must share, and the authority keys."""

    run_id: str
    model: Any
    data: Any
    train: TrainConfig = field(default_factory=TrainConfig)
    codec: Any = None
    merge: Any = None
    rounds: RoundConfig = field(default_factory=RoundConfig)
    shards: Any = None  # nord.shards.ShardConfig: how workers split the parameters
    authorities: tuple[str, ...] = ()  # hex ed25519 public keys allowed to seal rounds

    def __post_init__(self) -> None:
        if not RUN_ID_PATTERN.match(self.run_id):
            raise ConfigError(
                f"run id {self.run_id!r} is invalid: use 1-64 lowercase letters, digits, '.', '_' or '-'"
            )
        sections = _sections()
        if self.codec is None:
            object.__setattr__(self, "codec", sections["codec"]())
        if self.merge is None:
            object.__setattr__(self, "merge", sections["merge"]())
        if self.shards is None:
            object.__setattr__(self, "shards", sections["shards"]())
        for key in self.authorities:
            if not re.fullmatch(r"[0-9a-f]{64}", key):
                raise ConfigError(f"authority key {key!r} is not a 64-digit hex ed25519 public key")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        if not isinstance(raw, dict):
            raise ConfigError("run config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"run config has unknown keys: {', '.join(sorted(unknown))}")
        if "run_id" not in raw or "model" not in raw or "data" not in raw:
            raise ConfigError("run config needs at least 'run_id', 'model' and 'data'")
        kwargs: dict[str, Any] = {"run_id": raw["run_id"], "authorities": tuple(raw.get("authorities", ()))}
        for name, section_cls in _sections().items():
            if name in raw:
                kwargs[name] = _build_section(name, section_cls, raw[name])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"run config is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"run config not found: {p}")
        return cls.from_json(p.read_text(encoding="utf-8"))

    def with_authorities(self, keys: tuple[str, ...]) -> RunConfig:
        return dataclasses.replace(self, authorities=tuple(keys))


def _build_section(name: str, section_cls: type, raw: Any) -> Any:
    if isinstance(raw, section_cls):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"run config section {name!r} must be an object")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"run config section {name!r} has unknown keys: {', '.join(sorted(unknown))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return section_cls(**values)
    except TypeError as e:
        raise ConfigError(f"run config section {name!r}: {e}") from None
