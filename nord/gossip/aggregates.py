"""Serving and adopting sealed rounds as aggregates (nord.crdt.aggregate), for `Gossip`.

With `adopt="auto"` or `"aggregate"` a peer does not gather other peers' contributions: it pushes its own
to the run's bootstrap peers (the coordinator, relays), learns seals by seals-only syncs, and adopts the
seal of its open round either from the round's aggregate, which any peer that holds it can serve, or
("auto", when that is fewer bytes: few contributions) by fetching the listed contributions it lacks from a
bootstrap peer and recomputing the seal. An aggregate costs about the same whatever the number of
contributions (up to ~3 bytes per parameter); contributions cost each ~1/100 of that, so "auto" fetches
contributions below ~100 a round and the aggregate above (nord.protocol.adopt_by_contributions).
Holders announce one record per seal in the DHT,

    nord/<run>/aggregate/<round>    subkey <holder>    {seal, holder}

(N records a round, not one per contribution per holder), and a peer that lacks it tries up to
ANNOUNCED_TRIED announced holders, then the bootstrap peers, in random order. Nothing a holder sends is
trusted: `Replica.apply_aggregate` checks it against the authority's seal; a holder whose aggregate is
refused is not asked again for DISTRUST_S, one that fails otherwise for BACKOFF_S, and a download may
take at most AGGREGATE_TIMEOUT_S (anyone can write holder records: a liar costs one of those).

A peer builds an aggregate only for its tip seal (it keeps the weights before it), once per seal and one
at a time, outside the gossip lock; it keeps the bytes of the last KEEP_ROUNDS rounds it built or adopted.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from typing import TYPE_CHECKING

from nord.checks import is_count, is_hex64
from nord.crdt.aggregate import Aggregate, aggregate_max_bytes
from nord.errors import MergeError, TransportError
from nord.gossip.wire import (
    MAX_DELTA_BYTES,
    MAX_FETCH_IDS,
    RECORD_TTL_S,
    SNAPSHOT_META_BYTES,
    delta_from,
    pack,
    unpack,
)
from nord.protocol import adopt_by_contributions
from nord.transport.peer import network_peer

if TYPE_CHECKING:
    from nord.gossip.service import Gossip

log = logging.getLogger("nord.gossip")

KEEP_ROUNDS = 2  # aggregates kept to serve (up to ~3 bytes per parameter each)
ANNOUNCED_TRIED = 2  # announced holders asked for one round in one pass before the bootstrap peers
AGGREGATE_TIMEOUT_S = 120.0
DISTRUST_S = 600.0


class Aggregates:
    """One peer's aggregates: builds and serves them, and adopts the open round's seal from one."""

    def __init__(self, gossip: Gossip) -> None:
        self.gossip = gossip
        self._kept: dict[int, tuple[str, bytes]] = {}  # round -> (seal id, aggregate bytes)
        self._build = threading.Lock()  # one aggregate built at a time, outside the gossip lock
        self._distrusted: dict[str, float] = {}  # holder -> monotonic time until which it is not asked

    def serve(self, req: dict) -> bytes:
        """The aggregate of round `req["round"]`, kept or built from the tip; TransportError if neither."""
        rnd = req.get("round")
        if not is_count(rnd):
            raise TransportError("aggregate request: round must be a non-negative integer")
        with self._build:
            kept = self._kept.get(rnd)
            if kept is not None:
                return kept[1]
            with self.gossip.lock:
                parts = self.gossip.replica.aggregate_parts()
            if parts is None or parts[0].round != rnd:
                raise TransportError(f"this peer holds no aggregate of round {rnd}")
            data = Aggregate.build(*parts).to_bytes()
            self._keep(rnd, parts[0].seal_id, data)
            return data

    def _keep(self, rnd: int, seal_id: str, data: bytes) -> None:
        """Keep `data` to serve, and only the last KEEP_ROUNDS rounds' (call holding `_build`)."""
        self._kept[rnd] = (seal_id, data)
        for old in sorted(self._kept)[:-KEEP_ROUNDS]:
            del self._kept[old]

    def adopt(self) -> int:
        """Adopt, round after round, the seals this replica holds for its open round but cannot apply
        (their contributions are not here); how many rounds were adopted."""
        adopted = 0
        while True:
            with self.gossip.lock:
                replica = self.gossip.replica
                rnd, waiting = replica.round, replica.waiting_seals()
                if not waiting:
                    return adopted
                missing = [c for c in waiting[0].contribution_ids if not replica.has(c)]
                by_contributions = self._contributions_cheaper(len(waiting[0].contribution_ids), missing)
            if by_contributions:
                self._fetch_listed(missing)
            if not self._moved_past(rnd):  # or the bootstrap peers no longer held them all
                self._adopt_round(rnd)
            if not self._moved_past(rnd):
                return adopted
            adopted += 1

    def _moved_past(self, rnd: int) -> bool:
        with self.gossip.lock:
            return self.gossip.replica.round > rnd

    def _contributions_cheaper(self, listed: int, missing: list[str]) -> bool:
        """With adopt="auto": whether the `missing` contributions of a seal listing `listed` are fewer
        bytes than its aggregate, taking the contributions held for the round (ours) as typical.
        Call under the gossip lock."""
        replica = self.gossip.replica
        held = [e for _, e in replica.contributions(round=replica.round)]
        if self.gossip.adopt != "auto" or not held:
            return False
        numel = sum(math.prod(shape) for shape in replica.spec.values())
        nonzeros = sum(t.indices.numel() for t in held[0].delta().values())
        per_contribution = sum(e.nbytes for e in held) / len(held)
        return adopt_by_contributions(len(missing), per_contribution, listed, nonzeros / numel, numel)

    def _fetch_listed(self, missing: list[str]) -> None:
        """Fetch a seal's `missing` contributions from a bootstrap peer (they gather every contribution);
        the replica applies the seal once it holds them all."""
        g = self.gossip
        now = time.monotonic()
        peers = [p for p in g.bootstrap_peers if g._backoff.get(p, 0.0) <= now]
        random.shuffle(peers)
        for peer in peers:
            try:
                for start in range(0, len(missing), MAX_FETCH_IDS):
                    reply = g.transport.request(
                        peer,
                        "fetch",
                        pack({"run_id": g.run_id, "ids": missing[start : start + MAX_FETCH_IDS]}),
                        max_reply_bytes=MAX_DELTA_BYTES,
                    )
                    g._join(delta_from(unpack(reply, "fetch reply").get("delta")))
            except TransportError as e:
                g._failed(peer, "fetch", e)
                continue
            with g.lock:
                if all(g.replica.has(c) for c in missing):
                    return

    def _adopt_round(self, rnd: int) -> bool:
        g = self.gossip
        spec = g.replica.spec
        limit = aggregate_max_bytes(spec, SNAPSHOT_META_BYTES)
        for holder in self._holders(rnd):
            try:
                data = g.transport.request(
                    holder,
                    "aggregate",
                    pack({"run_id": g.run_id, "round": rnd}),
                    max_reply_bytes=limit,
                    timeout_s=AGGREGATE_TIMEOUT_S,
                )
                aggregate = Aggregate.from_bytes(data, spec)
                with g.lock:
                    if not g.replica.apply_aggregate(aggregate):
                        return True  # sealed here meanwhile (its contributions arrived)
            except TransportError as e:
                g._failed(holder, "aggregate", e)
                continue
            except MergeError as e:
                self._distrusted[holder] = time.monotonic() + DISTRUST_S
                log.warning(
                    "not asking %s for aggregates for %.0f s: %s", network_peer(holder), DISTRUST_S, e
                )
                continue
            with self._build:
                self._keep(rnd, aggregate.seal.seal_id, data)
            self._announce(rnd, aggregate.seal.seal_id)
            log.info(
                "adopted round %d's seal from %s's aggregate (%d bytes)", rnd, network_peer(holder), len(data)
            )
            if g.on_update is not None:
                g.on_update()
            return True
        return False

    def _holders(self, rnd: int) -> list[str]:
        """Up to ANNOUNCED_TRIED peers that announced the aggregate of round `rnd`, then the bootstrap
        peers, each in random order, none backed off or distrusted."""
        g = self.gossip
        now = time.monotonic()
        announced: list[str] = []
        try:
            records = g.transport.get_records(f"nord/{g.run_id}/aggregate/{rnd}")
        except TransportError:
            records = {}
        for holder, record in records.items():
            if isinstance(record, dict) and is_hex64(record.get("seal")) and holder != g.transport.peer_id:
                announced.append(holder)
        boot = [p for p in g.bootstrap_peers if p not in announced]
        usable = [p for p in announced if self._usable(p, now)]
        random.shuffle(usable)
        random.shuffle(boot)
        return usable[:ANNOUNCED_TRIED] + [p for p in boot if self._usable(p, now)]

    def _usable(self, peer: str, now: float) -> bool:
        return self.gossip._backoff.get(peer, 0.0) <= now and self._distrusted.get(peer, 0.0) <= now

    def _announce(self, rnd: int, seal_id: str) -> None:
        g = self.gossip
        if g.transport.config.client_mode:
            return  # nobody can dial us
        me = g.transport.peer_id
        try:
            g.transport.store_record(
                f"nord/{g.run_id}/aggregate/{rnd}", me, {"seal": seal_id, "holder": me}, RECORD_TTL_S
            )
        except TransportError as e:
            log.debug("could not announce the aggregate of round %d: %s", rnd, e)
