"""How a worker names other peers in its errors and logs (docs/volunteer.md, "Your id and your name").

A peer is named as everywhere else, by its signing key's fingerprint (`peer 3fd7fca16f0cac4ad32d`),
only when that key is known from an authenticated source: a hello reply that carries the key and the
key's signature over (run, the network id we asked). libp2p authenticates who is at the other end of a
stream; the signature binds the key to that network id, and cannot be replayed by another one. Presence
records in the DHT are writable by anyone and never used for this. Any other peer is named by its libp2p
network id, labelled so it is never taken for a fingerprint: `network peer ZqWdarUY…`
(nord.transport.network_peer).
"""

from __future__ import annotations

from typing import Any

from nord.checks import fingerprint, is_hex_key
from nord.gossip.wire import hello_binding
from nord.identity import verify_signature
from nord.transport.peer import network_peer


def hello_key(reply: dict[str, Any], run_id: str, peer_id: str) -> str | None:
    """The signing key (hex) a hello reply from `peer_id` proves it speaks for, or None."""
    key, signature = reply.get("key"), reply.get("binding")
    if not is_hex_key(key) or not isinstance(signature, bytes):
        return None
    if not verify_signature(bytes.fromhex(key), hello_binding(run_id, peer_id), signature):
        return None
    return key


class PeerNames:
    """Peer id -> the name errors and logs use, learned from verified hellos."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._keys: dict[str, str] = {}  # network id -> signing key hex, from verified hellos only

    def learn(self, peer_id: str, reply: dict[str, Any]) -> None:
        key = hello_key(reply, self.run_id, peer_id)
        if key is not None:
            self._keys[peer_id] = key

    def key_of(self, peer_id: str) -> str | None:
        return self._keys.get(peer_id)

    def __call__(self, peer_id: str) -> str:
        key = self._keys.get(peer_id)
        return f"peer {fingerprint(key)}" if key else network_peer(peer_id)
