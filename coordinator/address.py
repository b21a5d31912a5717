"""The coordinator's P2P address: one port for the life of its state dir, and how far it can be reached.

A join command is shared (chat, README, a poster); it names the coordinator's multiaddr, that is its
peer id (kept in the state dir's p2p.key) and its TCP port. A listen address with port 0 ("any free
port", the default) is replaced by the port chosen at the state dir's first start, kept in `p2p.port`, so
a restart keeps the command working. An explicit port in --host-maddrs overrides it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from pathlib import Path

from nord.errors import ConfigError
from nord.fsutil import atomic_write_bytes

PORT_FILE = "p2p.port"
_ANY_PORT = re.compile(r"/tcp/0(?=/|$)")
_HOST = re.compile(r"^/(ip4|ip6|dns|dns4|dns6)/([^/]+)")


def stable_host_maddrs(host_maddrs: Sequence[str], state_dir: Path) -> tuple[str, ...]:
    """`host_maddrs` with every `/tcp/0` set to this state dir's port (chosen and stored on first use)."""
    if not any(_ANY_PORT.search(m) for m in host_maddrs):
        return tuple(host_maddrs)
    port = _stored_port(state_dir / PORT_FILE) or _pick_port(state_dir / PORT_FILE)
    return tuple(_ANY_PORT.sub(f"/tcp/{port}", m) for m in host_maddrs)


def _stored_port(path: Path) -> int | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not (text.isdigit() and 0 < int(text) < 65536):
        raise ConfigError(f"{path}: {text[:20]!r} is not a TCP port; fix it or delete it to pick a new one")
    return int(text)


def _pick_port(path: Path) -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    atomic_write_bytes(path, f"{port}\n".encode("ascii"))
    return port


def scope(maddr: str) -> str:
    """'loopback', 'private' (RFC 1918, link-local, CGNAT, ULA) or 'public' for a multiaddr's host."""
    match = _HOST.match(maddr)
    if match is None:
        return "public"
    kind, host = match.groups()
    if kind.startswith("dns"):
        return "loopback" if host == "localhost" else "public"
    ip = ipaddress.ip_address(host)
    if ip.is_loopback:
        return "loopback"
    return "private" if ip.is_private or ip in _CGNAT else "public"


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def reach_note(multiaddrs: Sequence[str]) -> str | None:
    """A warning for the start-up lines when no announced address is reachable from the internet."""
    scopes = {scope(m) for m in multiaddrs}
    if not multiaddrs or "public" in scopes:
        return None
    where = "this machine" if scopes == {"loopback"} else "this network"
    return (
        f"warning: only {' and '.join(sorted(scopes))} addresses are announced: only {where} can join; "
        "to share the command, pass --announce-maddrs /ip4/<public ip>/tcp/<port> (and open that port)"
    )
