"""`WorkerOptions`: what `nord-node join` was asked, checked before anything starts (no I/O).

`Worker(options)` keeps them; `Worker.start()` acts on them (node.worker).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from node.session import peer_ids
from nord.checks import is_display_name
from nord.config import check_fingerprint
from nord.errors import ConfigError
from nord.protocol import ADOPT

DEFAULT_SHARDS = 8  # shard count when --shard is not given: worker i = hash(peer id) mod 8


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What `nord-node join` was asked to do, checked when made (no I/O)."""

    run_id: str
    initial_peers: tuple[str, ...]
    state_dir: Path
    authority: str | None = None
    device: str = "auto"
    data_dir: Path | None = None
    shard: str | None = None  # data shard i/n
    param_shards: str | None = None  # --shards
    name: str | None = None
    poll_s: float = 1.0
    progress: bool = True
    compact_every: int = 8
    host_maddrs: tuple[str, ...] = ()
    announce_maddrs: tuple[str, ...] = ()
    client_mode: bool = False
    local_only: bool = False
    adopt: str = "auto"  # how seals are adopted (nord.gossip.aggregates)

    def __post_init__(self) -> None:
        if not self.initial_peers:
            raise ConfigError(
                "no --initial-peers given: pass the run's bootstrap address (/ip4/.../p2p/<peer id>)"
            )
        peer_ids(self.initial_peers)  # each names its peer
        if self.authority:
            check_fingerprint(self.authority, "--authority")
        if self.shard:
            parse_data_shard(self.shard)
        if self.name is not None and not is_display_name(self.name):
            raise ConfigError(f"--name {self.name[:40]!r} is not a display name")
        if self.adopt not in ADOPT:
            raise ConfigError(f"--adopt must be one of {', '.join(ADOPT)}, got {self.adopt!r}")
        if self.poll_s <= 0 or self.compact_every < 1:
            raise ConfigError("--poll-s must be > 0 and --compact-every >= 1")

    @classmethod
    def from_args(cls, args) -> WorkerOptions:
        return cls(
            run_id=args.run,
            initial_peers=tuple(args.initial_peers or ()),
            state_dir=Path(args.state_dir or Path.home() / ".nord" / args.run).expanduser(),
            authority=args.authority,
            device=args.device,
            data_dir=Path(args.data_dir).expanduser() if args.data_dir else None,
            shard=args.shard,
            param_shards=getattr(args, "shards", None),
            name=getattr(args, "name", None),
            poll_s=args.poll_s,
            progress=not args.no_progress,
            compact_every=args.compact_every,
            host_maddrs=tuple(args.host_maddrs or ()),
            announce_maddrs=tuple(args.announce_maddrs or ()),
            client_mode=bool(getattr(args, "client_mode", False)),
            local_only=bool(args.local_only),
            adopt=getattr(args, "adopt", "auto"),
        )


def parse_data_shard(flag: str) -> tuple[int, int]:
    """`--shard i/n` as (i, n); ConfigError naming the fix."""
    try:
        i, n = (int(x) for x in flag.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {flag!r}: write i/n, e.g. 2/8") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {flag!r}: need 0 <= i < n")
    return i, n


def shard_for(peer_id: str, override: str | None) -> tuple[int, int]:
    """`--shard i/n`, else shard hash(peer id) mod DEFAULT_SHARDS of DEFAULT_SHARDS."""
    if override:
        return parse_data_shard(override)
    digest = hashlib.sha256(peer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % DEFAULT_SHARDS, DEFAULT_SHARDS
