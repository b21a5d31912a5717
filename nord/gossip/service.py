"""`Gossip`: serves the protocol's handlers over one replica and runs push, pull and anti-entropy.

See the package docstring for the handlers, the DHT records and the locking rule.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nord.checks import is_hex64
from nord.crdt import Delta, Removal, Replica, Seal
from nord.errors import ConfigError, MergeError, NordError, TransportError
from nord.gossip.aggregates import Aggregates
from nord.gossip.wire import (
    BACKOFF_S,
    MAX_DELTA_BYTES,
    MAX_FETCH_IDS,
    PEER_TTL_S,
    PUSH_TIMEOUT_S,
    RECORD_TTL_S,
    SMALL_REQUEST_BYTES,
    SYNC_BUDGET_BYTES,
    delta_from,
    fetch_ids,
    hello_binding,
    pack,
    request_of,
    unpack,
    within_budget,
)
from nord.identity import Identity
from nord.protocol import ADOPT, next_fetch, reachable, sync_partners
from nord.transport import Transport
from nord.transport.peer import network_peer

log = logging.getLogger("nord.gossip")


class Gossip:
    """Serves and runs the anti-entropy protocol for one replica.

    Args:
        transport: a started Transport.
        replica: this peer's replica of the run.
        run_config_json: the run's RunConfig as JSON (served to joining peers).
        role: "worker" or "coordinator" (shown to peers).
        bootstrap_peers: peer ids always tried (the run's bootstrap peers), besides those found in the DHT.
        tokenizer_path: tokenizer.json to serve, if this peer has one.
        on_update: called (without the lock) after anything new was accepted from a peer.
        presence: extra fields of this peer's presence record, e.g. {"key": signing key hex, "device": ...}.
        on_heard: called with the peer id of every request received, before it is handled (may be set
            after construction; the coordinator's liveness uses it).
        identity: this peer's signing key: hello replies carry it and its signature of `hello_binding`.
        adopt: how this peer adopts seals: "contributions" (gather every contribution and recompute each
            seal: the coordinator and relays), or "auto"/"aggregate" (push our own to the bootstrap
            peers only, sync seals only, and adopt each seal from its aggregate, or with "auto" from
            its contributions when they are fewer bytes: nord.gossip.aggregates).
    """

    def __init__(
        self,
        transport: Transport,
        replica: Replica,
        run_config_json: str,
        *,
        role: str = "worker",
        bootstrap_peers: tuple[str, ...] = (),
        tokenizer_path: str | Path | None = None,
        on_update: Callable[[], None] | None = None,
        presence: dict[str, Any] | None = None,
        on_heard: Callable[[str], None] | None = None,
        identity: Identity | None = None,
        adopt: str = "contributions",
    ) -> None:
        if adopt not in ADOPT:
            raise ConfigError(f"adopt must be one of {ADOPT}, got {adopt!r}")
        self.adopt = adopt
        self.aggregates = Aggregates(self)
        self.transport = transport
        self.replica = replica
        self.run_id = replica.run_id
        self.run_config_json = run_config_json
        self.role = role
        self.bootstrap_peers = tuple(p for p in bootstrap_peers if p != transport.peer_id)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.on_update = on_update
        self.presence = dict(presence or {})
        self.on_heard = on_heard
        self._hello_key = {}  # what hello replies say of this peer's signing key
        if identity is not None:
            binding = identity.sign(hello_binding(self.run_id, transport.peer_id))
            self._hello_key = {"key": identity.public_hex, "binding": binding}
        self.lock = threading.RLock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="nord-gossip")
        self._snapshot_cache: tuple[tuple[int, str], bytes] | None = None  # (round, base hash), bytes
        self._snapshot_build = threading.Lock()  # one snapshot serialised at a time, outside `lock`
        self._peers: dict[str, dict[str, Any]] = {}
        self._backoff: dict[str, float] = {}  # peer id -> monotonic time until which it is skipped

    # ---- serving -----------------------------------------------------------------------------------------

    def serve(self) -> None:
        """Register the handlers and announce this peer in the DHT."""
        handlers = {
            "hello": (self._on_hello, SMALL_REQUEST_BYTES),
            "config": (self._on_config, SMALL_REQUEST_BYTES),
            "sync": (self._on_sync, SMALL_REQUEST_BYTES),
            "push": (self._on_push, MAX_DELTA_BYTES),
            "fetch": (self._on_fetch, SMALL_REQUEST_BYTES),
            "snapshot": (self._on_snapshot, SMALL_REQUEST_BYTES),
            "aggregate": (self._on_aggregate, SMALL_REQUEST_BYTES),
            "tokenizer": (self._on_tokenizer, SMALL_REQUEST_BYTES),
        }
        for name, (fn, max_bytes) in handlers.items():
            self.transport.add_handler(name, self._noting_sender(fn), max_request_bytes=max_bytes)
        self.heartbeat()

    def _noting_sender(self, fn: Callable[[str, bytes], bytes]) -> Callable[[str, bytes], bytes]:
        def handler(peer: str, body: bytes) -> bytes:
            if self.on_heard is not None:
                self.on_heard(peer)
            return fn(peer, body)

        return handler

    def _request_of(self, body: bytes, name: str) -> dict[str, Any]:
        return request_of(body, name, self.run_id)

    def _on_hello(self, peer: str, body: bytes) -> bytes:
        self._request_of(body, "hello")
        with self.lock:
            state = {"round": self.replica.round, "base_hash": self.replica.base_hash}
        return pack(
            {
                "run_id": self.run_id,
                "role": self.role,
                "client_mode": self.transport.config.client_mode,
                **state,
                **self._hello_key,
            }
        )

    def _on_config(self, peer: str, body: bytes) -> bytes:
        self._request_of(body, "config")
        return self.run_config_json.encode("utf-8")

    def _on_sync(self, peer: str, body: bytes) -> bytes:
        req = self._request_of(body, "sync")
        digest, contributions = req.get("digest"), req.get("contributions", True)
        if not isinstance(digest, dict):
            raise TransportError("sync request carries no digest")
        if not isinstance(contributions, bool):
            raise TransportError("sync request: contributions must be true or false")
        with self.lock:
            behind = self.replica.needs_snapshot(digest)
            delta = self.replica.delta_for(digest)
            mine = self.replica.digest()
        if not contributions:  # a peer that adopts seals from aggregates: seals and removals only
            delta = Delta(removals=delta.removals, seals=delta.seals)
        delta, more = within_budget(delta, SYNC_BUDGET_BYTES)
        gathers = self.adopt == "contributions"  # whether the caller should push us contributions
        reply = {"delta": delta.to_bytes(), "digest": mine, "behind": behind, "more": more}
        return pack({**reply, "contributions": gathers})

    def _on_push(self, peer: str, body: bytes) -> bytes:
        req = self._request_of(body, "push")
        accepted = self._join(delta_from(req.get("delta")))
        return pack({"accepted": accepted})

    def _on_fetch(self, peer: str, body: bytes) -> bytes:
        ids = fetch_ids(self._request_of(body, "fetch"))
        with self.lock:
            held = [e.to_bytes() for cid, e in self.replica.contributions() if cid in ids]
        delta, _ = within_budget(Delta(envelopes=tuple(held)), SYNC_BUDGET_BYTES)
        return pack({"delta": delta.to_bytes()})

    def _on_snapshot(self, peer: str, body: bytes) -> bytes:
        """The sealed tip: a view taken under the lock, serialised outside it, one at a time (a whole
        model each), and cached until the tip moves, so concurrent requests share one serialisation."""
        self._request_of(body, "snapshot")
        with self._snapshot_build:
            with self.lock:
                view = self.replica.snapshot_view()
            key = (view.round, view.base_hash)
            if self._snapshot_cache is None or self._snapshot_cache[0] != key:
                with tempfile.TemporaryDirectory(prefix="nord-snapshot-") as tmp:
                    path = Path(tmp) / "snapshot.safetensors"
                    view.write(path)
                    self._snapshot_cache = (key, path.read_bytes())
            return self._snapshot_cache[1]

    def _on_aggregate(self, peer: str, body: bytes) -> bytes:
        return self.aggregates.serve(self._request_of(body, "aggregate"))

    def _on_tokenizer(self, peer: str, body: bytes) -> bytes:
        self._request_of(body, "tokenizer")
        if self.tokenizer_path is None or not self.tokenizer_path.is_file():
            raise NordError("this peer has no tokenizer to serve")
        return self.tokenizer_path.read_bytes()

    def _join(self, delta: Delta) -> int:
        with self.lock:
            before = {cid for cid, _ in self.replica.contributions()}
            accepted = self.replica.join(delta)
            new = [(cid, e) for cid, e in self.replica.contributions() if cid not in before]
        if new:
            self._pool.submit(self._announce_holder, new)
        if accepted and self.on_update is not None:
            self.on_update()
        return accepted

    # ---- peers -------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Refresh this peer's presence record (call every ~PEER_TTL_S / 3)."""
        record = {**self.presence, "role": self.role, "client_mode": self.transport.config.client_mode}
        try:
            self.transport.store_record(
                f"nord/{self.run_id}/peers", self.transport.peer_id, record, PEER_TTL_S
            )
        except TransportError as e:
            log.warning("could not announce this peer: %s", e)

    def peers(self) -> dict[str, dict[str, Any]]:
        """Live peers of the run (peer id -> {role, client_mode}) but this one; bootstrap peers always."""
        found = {p: {"role": "bootstrap", "client_mode": False} for p in self.bootstrap_peers}
        try:
            for peer, record in self.transport.get_records(f"nord/{self.run_id}/peers").items():
                if peer != self.transport.peer_id and isinstance(record, dict):
                    found[peer] = {
                        "role": str(record.get("role")),
                        "client_mode": bool(record.get("client_mode")),
                    }
        except TransportError as e:
            log.debug("peer lookup failed: %s", e)
        self._peers = found
        return found

    def reachable_peers(self) -> list[str]:
        """Peers others can dial (not client mode), except those that failed in the last BACKOFF_S."""
        peers = {p: info["client_mode"] for p, info in self.peers().items()}
        return reachable(peers, self._backoff, time.monotonic())

    def _failed(self, peer: str, what: str, error: TransportError) -> None:
        first = peer not in self._backoff
        self._backoff[peer] = time.monotonic() + BACKOFF_S
        level = logging.INFO if first else logging.DEBUG
        log.log(level, "%s with %s failed: %s", what, network_peer(peer), error)

    # ---- spreading ---------------------------------------------------------------------------------------

    def publish(self, envelope: Any) -> int:
        """Announce our contribution (already added to the replica) and push it to every reachable peer.

        Returns how many peers accepted the push.
        """
        self._announce_holder([(envelope.contribution_id, envelope)])
        delta = Delta(envelopes=(envelope.to_bytes(),))
        if self.adopt != "contributions":  # the bootstrap peers gather contributions; nobody else needs ours
            reachable = set(self.reachable_peers())
            return self._push_all(delta, [p for p in self.bootstrap_peers if p in reachable])
        return self._push_all(delta)

    def publish_seal(self, seal: Seal) -> int:
        return self._push_all(Delta(seals=(seal,)))

    def publish_removal(self, removal: Removal) -> int:
        return self._push_all(Delta(removals=(removal,)))

    def _push_all(self, delta: Delta, peers: list[str] | None = None) -> int:
        body = pack({"run_id": self.run_id, "delta": delta.to_bytes()})
        targets = self.reachable_peers() if peers is None else peers
        futures = [self._pool.submit(self._push_one, peer, body) for peer in targets]
        return sum(f.result() for f in futures)

    def _push_one(self, peer: str, body: bytes) -> int:
        try:
            reply = unpack(
                self.transport.request(
                    peer, "push", body, max_reply_bytes=SMALL_REQUEST_BYTES, timeout_s=PUSH_TIMEOUT_S
                ),
                "push",
            )
            self._backoff.pop(peer, None)
            return int(bool(reply.get("accepted")))
        except TransportError as e:
            self._failed(peer, "push", e)
            return 0

    def _announce_holder(self, items: list[tuple[str, Any]]) -> None:
        me = self.transport.peer_id
        for cid, envelope in items:
            record = {"cid": cid, "round": int(envelope.round), "size": int(envelope.nbytes), "holder": me}
            try:
                self.transport.store_record(
                    f"nord/{self.run_id}/contrib/{envelope.round}", f"{cid}/{me}", record, RECORD_TTL_S
                )
            except TransportError as e:
                log.debug("could not announce %s: %s", cid[:16], e)

    # ---- pulling -----------------------------------------------------------------------------------------

    def sync_with(self, peer: str) -> tuple[int, bool]:
        """Two-way exchange with `peer`; returns (items accepted here, whether we lag its compaction).
        Unless adopt="contributions" it brings seals and removals only; it sends what `peer` lacks, but
        contributions only to a peer that gathers them (its reply says so)."""
        accepted, behind = 0, False
        request = {"run_id": self.run_id, "contributions": self.adopt == "contributions"}
        for _ in range(64):  # bounded: each reply carries at most SYNC_BUDGET_BYTES of envelopes
            with self.lock:
                digest = self.replica.digest()
            reply = unpack(
                self.transport.request(
                    peer, "sync", pack({**request, "digest": digest}), max_reply_bytes=MAX_DELTA_BYTES
                ),
                "sync reply",
            )
            behind = bool(reply.get("behind"))
            got = self._join(delta_from(reply.get("delta")))
            accepted += got
            if not reply.get("more") or got == 0:
                break
        remote = reply.get("digest")
        if isinstance(remote, dict) and not behind:
            try:
                with self.lock:
                    theirs, _ = within_budget(self.replica.delta_for(remote), SYNC_BUDGET_BYTES)
                if reply.get("contributions") is False:
                    theirs = Delta(removals=theirs.removals, seals=theirs.seals)
            except MergeError as e:
                raise TransportError(f"{network_peer(peer)} sent a malformed digest: {e}") from None
            if len(theirs):
                self._push_one(peer, pack({"run_id": self.run_id, "delta": theirs.to_bytes()}))
        return accepted, behind

    def pull_announced(self, rounds: range) -> int:
        """Fetch contributions announced in the DHT for `rounds` that we lack, from any of their holders."""
        wanted: dict[str, list[str]] = {}
        for rnd in rounds:
            if rnd < 0:
                continue
            try:
                records = self.transport.get_records(f"nord/{self.run_id}/contrib/{rnd}")
            except TransportError:
                continue
            for record in records.values():  # anyone can write these: a bad id would spoil a fetch
                if isinstance(record, dict) and is_hex64(record.get("cid")):
                    wanted.setdefault(record["cid"], []).append(str(record.get("holder")))
        me = self.transport.peer_id
        with self.lock:
            remaining = {cid: set(h) - {me} for cid, h in wanted.items() if not self.replica.has(cid)}
        now = time.monotonic()
        accepted, tried = 0, {p for p, until in self._backoff.items() if until > now}
        tried |= {p for p, info in self._peers.items() if info["client_mode"]}  # nobody can dial them
        while remaining:
            step = next_fetch(remaining, tried)  # the holder of most of what we lack first
            if step is None:
                break
            holder, ids = step
            ids = ids[:MAX_FETCH_IDS]  # the rest in the next anti-entropy pass
            tried.add(holder)
            try:
                reply = unpack(
                    self.transport.request(
                        holder,
                        "fetch",
                        pack({"run_id": self.run_id, "ids": ids}),
                        max_reply_bytes=MAX_DELTA_BYTES,
                    ),
                    "fetch reply",
                )
                accepted += self._join(delta_from(reply.get("delta")))
            except TransportError as e:
                self._failed(holder, "fetch", e)
                continue
            with self.lock:
                remaining = {cid: h for cid, h in remaining.items() if not self.replica.has(cid)}
        return accepted

    def anti_entropy(self, fanout: int = 2) -> tuple[int, bool]:
        """Pull announced contributions, then sync with up to `fanout` random reachable peers; with
        another `adopt`, sync (seals only), then adopt the held seals (nord.gossip.aggregates).

        Returns (items accepted, whether some peer says we are behind its compaction point).
        """
        with self.lock:
            rnd, staleness = self.replica.round, self.replica.merge.max_staleness
        accepted = 0
        if self.adopt == "contributions":
            accepted = self.pull_announced(range(rnd - staleness, rnd + staleness + 1))
        peers = self.reachable_peers()
        behind = False
        for peer in sync_partners(peers, fanout, random):
            try:
                got, peer_behind = self.sync_with(peer)
            except TransportError as e:
                self._failed(peer, "sync", e)
                continue
            self._backoff.pop(peer, None)
            accepted += got
            behind = behind or peer_behind
        if self.adopt != "contributions":
            accepted += self.aggregates.adopt()
        return accepted, behind

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
