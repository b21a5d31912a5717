"""Catching up with a run whose peers compacted past this replica, without trusting any one peer.

A peer's `behind` flag (we are older than its compaction point) is a claim, not a fact. `CatchUp` syncs
with a few random reachable peers (never the first in id order: peer ids can be ground), downloads a
snapshot only from one that says we are behind it, verifies it (`Replica.from_snapshot`:
genesis hash or authority seal) into `replica.new/`, and only then is the old replica swapped out
(`StateDir.swap_replica`). A peer whose snapshot fails verification or is not newer is not asked again
for DISTRUST_S (one warning), and a pass that adopted nothing is not repeated for CATCH_UP_EVERY_S: a
liar costs at most one download per DISTRUST_S, and any number of liars at most SNAPSHOT_CANDIDATES
downloads per CATCH_UP_EVERY_S (docs/security.md: Sybils are not bounded otherwise).
"""

from __future__ import annotations

import logging
import random
import shutil
import time

from node.peers import PeerNames
from node.session import fetch_replica, replica_settings
from node.state import StateDir
from nord.config import RunConfig
from nord.crdt import Replica
from nord.errors import TransportError
from nord.gossip import Gossip, hello
from nord.transport import Transport

log = logging.getLogger(__name__)

DISTRUST_S = 600.0  # a peer whose state failed verification (or was not newer) is not asked this long
CATCH_UP_EVERY_S = 30.0  # after a pass that adopted nothing, `behind` is ignored this long
SNAPSHOT_CANDIDATES = 3  # peers asked for their round in one pass


class CatchUp:
    """Finds, verifies and stages a newer sealed state for one worker's replica."""

    def __init__(self, run: RunConfig, transport: Transport, state: StateDir, names: PeerNames) -> None:
        self.run, self.transport, self.state, self.names = run, transport, state, names
        self.distrusted: dict[str, float] = {}  # peer id -> monotonic time until which it is not asked
        self._next = 0.0
        self._told = False  # the "no newer state" line is logged once (then at DEBUG)

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def fetch_newer(self, gossip: Gossip, mine: int) -> int | None:
        """Stage (in `replica.new/`) the verified snapshot, newer than round `mine`, of a random peer
        that says we are behind it, and return its round; None, and no new pass for CATCH_UP_EVERY_S,
        if no peer asked has one."""
        now = time.monotonic()
        candidates = [p for p in gossip.reachable_peers() if self.distrusted.get(p, 0.0) <= now]
        for peer in random.sample(candidates, min(SNAPSHOT_CANDIDATES, len(candidates))):
            try:
                self.names.learn(peer, hello(self.transport, peer, self.run.run_id))  # who it is, for logs
                _, behind = gossip.sync_with(peer)
            except TransportError:
                continue
            if not behind:
                continue  # this peer has nothing we cannot get by anti-entropy
            shutil.rmtree(self.state.incoming_replica_dir, ignore_errors=True)
            try:
                fresh = fetch_replica(
                    self.run, self.transport, peer, self.state.incoming_replica_dir, self.names
                )
            except TransportError as e:
                self.distrust(peer, str(e))
                continue
            fresh.close()
            if fresh.round <= mine:
                shutil.rmtree(self.state.incoming_replica_dir, ignore_errors=True)
                self.distrust(peer, f"it says we are behind, its sealed snapshot is of round {fresh.round}")
                continue
            log.warning(
                "replica behind the peers' compaction point: round %d verified from %s (was %d)",
                fresh.round,
                self.names(peer),
                mine,
            )
            return fresh.round
        log.log(
            logging.DEBUG if self._told else logging.INFO,
            "a peer says this replica is behind, but no peer asked had a newer verified state; "
            "not looking again for %.0f s",
            CATCH_UP_EVERY_S,
        )
        self._told = True
        self._next = now + CATCH_UP_EVERY_S
        return None

    def swap_in(self, current: Replica, staged_round: int) -> Replica:
        """The staged replica in place of `current` (closed), if it is still newer; else `current` (call
        under the gossip lock, so nothing is added to either meanwhile)."""
        if current.round >= staged_round:  # anti-entropy got there first: keep what we have
            shutil.rmtree(self.state.incoming_replica_dir, ignore_errors=True)
            return current
        current.close()
        self.state.swap_replica()
        return Replica.open(self.state.replica_dir, **replica_settings(self.run))

    def distrust(self, peer: str, why: str) -> None:
        """Do not ask `peer` for state for DISTRUST_S; one warning per period."""
        self.distrusted[peer] = time.monotonic() + DISTRUST_S
        log.warning("not trusting %s's state for %.0f s: %s", self.names(peer), DISTRUST_S, why)
