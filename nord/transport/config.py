"""`TransportConfig`: how one peer starts (addresses, client mode, identity, loopback-only for tests)."""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.utils.multiaddr import Multiaddr

from nord.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """How to start one peer."""

    # multiaddrs with /p2p/<peer id> of running peers; () starts a new swarm
    initial_peers: tuple[str, ...] = ()
    # where to listen; () -> 127.0.0.1 when local_only, else 0.0.0.0, both on a free tcp port
    host_maddrs: tuple[str, ...] = ()
    announce_maddrs: tuple[str, ...] = ()  # public addresses to advertise (explicit ports), e.g. behind NAT
    client_mode: bool = False  # cannot accept inbound connections (Colab): serve no DHT, dial out only
    identity_path: str | None = None  # libp2p private key file; created if missing; None -> a fresh peer id
    local_only: bool = False  # tests: loopback only, no UPnP / NAT-PMP / AutoNAT / relays
    startup_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    # a stream whose peer sends or reads nothing for this long (one chunk per read) is cut
    idle_timeout_s: float = 30.0
    # inbound streams served at once, per peer and in all; more are refused with an error frame
    max_streams_per_peer: int = 8
    max_streams: int = 128
    # request bytes received and held at once, over all inbound streams (a request over it is refused)
    max_inbound_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for field_name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for addr in getattr(self, field_name):
                if field_name == "initial_peers":
                    peer_id_of(addr)
                else:
                    _parse(addr, field_name)
        if not (self.startup_timeout_s > 0 and self.request_timeout_s > 0 and self.idle_timeout_s > 0):
            raise ConfigError("transport timeouts must be > 0")
        if not 1 <= self.max_streams_per_peer <= self.max_streams:
            raise ConfigError("transport stream caps: need 1 <= max_streams_per_peer <= max_streams")
        if self.max_inbound_bytes < 1 << 20:
            raise ConfigError("transport max_inbound_bytes must be at least 1 MiB")

    def resolved_host_maddrs(self) -> tuple[str, ...]:
        if self.host_maddrs:
            return self.host_maddrs
        return ("/ip4/127.0.0.1/tcp/0",) if self.local_only else ("/ip4/0.0.0.0/tcp/0",)


def peer_id_of(maddr: str) -> str:
    """The peer id in a `/.../p2p/<peer id>` multiaddr; ConfigError if it has none."""
    parsed = _parse(maddr, "initial peer")
    if "p2p" not in parsed:
        raise ConfigError(
            f"initial peer {maddr!r} has no /p2p/<peer id> part; "
            "copy the full address the bootstrap peer prints"
        )
    return str(parsed["p2p"])


def _parse(addr: str, what: str) -> Multiaddr:
    try:
        return Multiaddr(addr)
    except Exception as e:  # multiaddr raises several unrelated types
        raise ConfigError(f"{what}: {addr!r} is not a multiaddr ({e})") from None
