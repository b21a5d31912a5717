"""Who is online: a peer is online while it was heard from within ONLINE_WINDOW_S (60 s, in history.py).

Heard from means one of:

    a gossip request from it          `heard(peer_id)`, the Gossip `on_heard` hook (any handler)
    its presence record in the DHT    `sync_presence`, every PEER_TTL_S / 3 (20 s); the record lives
                                      PEER_TTL_S (60 s) after its owner's last heartbeat
    a contribution of it arriving     History.record_contribution, once per contribution

and its row's `last_seen` is the latest of those times. Holding a peer's contributions is not hearing from
it. So a peer that stops is shown offline at most ONLINE_WINDOW_S after its last request or contribution,
and at most ONLINE_WINDOW_S + PEER_TTL_S + 20 s after its last heartbeat (its record outlives it in the DHT).
Each seal records how many peers were online then (History.seal_round), from the times written here.

Requests and presence records name the libp2p peer id, the history names the signing key: a presence record
that carries its `key` links the two (a peer that announces no key is heard only through contributions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from coordinator.history import ONLINE_WINDOW_S, History
from nord.checks import is_display_name, is_hex_key
from nord.errors import TransportError

log = logging.getLogger(__name__)

MAX_DEVICE_CHARS = 64


class Liveness:
    """Collects when each peer was last heard from and writes it to the history (from the server loop)."""

    def __init__(self, history: History, *, clock: Callable[[], float] = time.time):
        self.history, self.clock = history, clock
        self._lock = threading.Lock()
        self._heard: dict[str, float] = {}  # peer id -> last request time, not yet written
        self._keys: dict[str, str] = {}  # peer id -> signing key hex, from the latest presence records

    def heard(self, peer_id: str) -> None:
        """A request from `peer_id` arrived (called in gossip handler threads: memory only)."""
        with self._lock:
            self._heard[peer_id] = self.clock()

    def sync_presence(self, transport, run_id: str) -> int:
        """Copy the run's presence records into the history: heard now, with mode and device, for records
        that name their signing key (`key`: hex ed25519, `device`: free text, `name`: a display name that
        nord.checks.is_display_name accepts, else ignored); return how many."""
        try:
            records = transport.get_records(f"nord/{run_id}/peers")
        except TransportError as e:
            log.debug("presence lookup failed: %s", e)
            return 0
        keys, now = {}, self.clock()
        for peer_id, record in records.items():
            key = record.get("key") if isinstance(record, dict) else None
            if not is_hex_key(key):
                continue
            keys[peer_id] = key
            device, name = record.get("device"), record.get("name")
            self.history.touch_peer(
                key,
                mode="client" if record.get("client_mode") else "public",
                device=device[:MAX_DEVICE_CHARS] if isinstance(device, str) and device else None,
                name=name if is_display_name(name) else None,
                at=now,
            )
        with self._lock:
            self._keys = keys
        return len(keys)

    def flush(self) -> int:
        """Write the request times collected since the last flush; return how many peers were written.

        A request from a peer id whose key is not known yet is kept until its presence record is read,
        for at most ONLINE_WINDOW_S (after that it would not make the peer online anyway).
        """
        now = self.clock()
        with self._lock:
            heard, keys = self._heard, self._keys
            known = {keys[p]: at for p, at in heard.items() if p in keys}
            self._heard = {p: at for p, at in heard.items() if p not in keys and now - at < ONLINE_WINDOW_S}
        self.history.touch_peers(known)
        return len(known)
