"""`RunConfig`: everything the peers of one run must agree on, as one JSON document.

The coordinator publishes it; workers fetch it before training. Each section's dataclass lives next to
the code it configures (model, data, codec, merge); this module only composes them and owns the
training-loop settings that belong to no single component.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nord.checks import fingerprint, is_count, is_fingerprint, is_hex64, is_run_id, matches_fingerprint
from nord.errors import ConfigError

SIGNING_DOMAIN = b"nord-run-config\0"


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
    # the run's goal, shown with an ETA on the dashboard (0: open-ended); at most one of the two
    target_rounds: int = 0  # sealed rounds
    target_tokens: int = 0  # tokens in accepted contributions

    def __post_init__(self) -> None:
        if self.quorum < 1:
            raise ConfigError(f"rounds.quorum must be >= 1, got {self.quorum}")
        if not self.deadline_s > 0:
            raise ConfigError(f"rounds.deadline_s must be > 0, got {self.deadline_s}")
        for name in ("target_rounds", "target_tokens"):
            if not is_count(getattr(self, name)):
                raise ConfigError(f"rounds.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.target_rounds and self.target_tokens:
            raise ConfigError("set rounds.target_rounds or rounds.target_tokens, not both")


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
    genesis_hash: str = ""  # weights_hash of round 0's weights (`init`): a round-0 snapshot must match it
    signature: str = ""  # hex ed25519 signature of every other field by one of `authorities` (`signed`)

    def __post_init__(self) -> None:
        if not is_run_id(self.run_id):
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
            if not is_hex64(key):
                raise ConfigError(f"authority key {key!r} is not a 64-digit hex ed25519 public key")
        if self.genesis_hash and not is_hex64(self.genesis_hash):
            raise ConfigError(f"genesis_hash {self.genesis_hash[:80]!r} is not a 64-digit hex weights hash")
        if self.signature and not (len(self.signature) == 128 and is_hex64(self.signature[:64])):
            raise ConfigError("signature is not a 128-digit hex ed25519 signature")

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
        kwargs: dict[str, Any] = {
            "run_id": raw["run_id"],
            "authorities": tuple(raw.get("authorities", ())),
            "genesis_hash": raw.get("genesis_hash", ""),
            "signature": raw.get("signature", ""),
        }
        if not all(isinstance(kwargs[k], str) for k in ("run_id", "genesis_hash", "signature")) or not all(
            isinstance(k, str) for k in kwargs["authorities"]
        ):
            raise ConfigError(
                "run config: run_id, genesis_hash, signature and authority keys must be strings"
            )
        for name, section_cls in _sections().items():
            if name in raw:
                kwargs[name] = _build_section(name, section_cls, raw[name])
        run = cls(**kwargs)
        object.__setattr__(run, "_signed_body", _canonical(raw))
        return run

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
        """This config with other authorities (unsigned: sign it again with `signed`)."""
        return dataclasses.replace(self, authorities=tuple(keys), signature="")

    # ---- the trust anchor ----------------------------------------------------------------------------

    def signing_message(self) -> bytes:
        """Canonical bytes of every field but the signature (what an authority signs): of the document
        as received for a parsed config (a newer version's defaults for fields it lacked do not change
        what its authority signed), else of this config."""
        body = getattr(self, "_signed_body", None) or _canonical(self.to_dict())
        return SIGNING_DOMAIN + body

    def signed(self, identity: Any) -> RunConfig:
        """This config signed by `identity`, which must be one of its authorities; the genesis hash must
        be set (what the signature vouches for includes the run's initial weights)."""
        if identity.public_hex not in self.authorities:
            raise ConfigError(f"key {identity.public_hex[:16]}… is not an authority of run {self.run_id!r}")
        if not self.genesis_hash:
            raise ConfigError(
                f"run {self.run_id!r} has no genesis_hash: create it with `nord-coordinator init`"
            )
        unsigned = dataclasses.replace(self, signature="")
        return dataclasses.replace(unsigned, signature=identity.sign(unsigned.signing_message()).hex())

    def signer(self) -> str:
        """The authority key (hex) whose signature this config carries; ConfigError if none does."""
        from nord.identity import verify_signature

        if not self.signature:
            raise ConfigError(f"the config of run {self.run_id!r} is not signed by its authority")
        message, signature = self.signing_message(), bytes.fromhex(self.signature)
        for key in self.authorities:
            if verify_signature(bytes.fromhex(key), message, signature):
                return key
        raise ConfigError(f"the config of run {self.run_id!r} carries a signature by none of its authorities")

    def verify(self, pinned: str | None) -> str:
        """The signing authority's key if the signature holds and, given a pinned fingerprint, the key
        matches it; ConfigError (one line naming both fingerprints) otherwise. Also needs a genesis hash."""
        key = self.signer()
        if not self.genesis_hash:
            raise ConfigError(f"the config of run {self.run_id!r} records no genesis weights hash")
        if pinned is not None and not matches_fingerprint(key, pinned):
            raise ConfigError(
                f"the config of run {self.run_id!r} is signed by authority {fingerprint(key)}, "
                f"not the pinned {pinned}: refusing it (a different or impostor run)"
            )
        return key


def _canonical(raw: dict[str, Any]) -> bytes | None:
    """Sorted, compact JSON of a config document without its signature (None if not plain JSON)."""
    try:
        body = {k: v for k, v in raw.items() if k != "signature"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError):
        return None


def check_fingerprint(value: str, where: str) -> str:
    """A user-given fingerprint in canonical form (lowercase), or ConfigError."""
    pinned = value.strip().lower()
    if not is_fingerprint(pinned):
        raise ConfigError(f"{where} {value[:80]!r}: give 16-64 hex digits of the run's authority key")
    return pinned


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
