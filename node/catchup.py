"""Catching up with a run whose peers compacted past this replica, without trusting any one peer.

A peer's `behind` flag (we are older than its compaction point) is a claim, not a fact. `CatchUp` asks a
few random reachable peers (never the first in id order: peer ids can be ground) for their round,
downloads a snapshot only from one that claims a newer round, verifies it (`Replica.from_snapshot`:
genesis hash or authority seal) into `replica.new/`, and only then is the old replica swapped out
(`StateDir.swap_replica`). A peer whose snapshot fails verification or is not newer is not asked again
for DISTRUST_S (one warning), and a pass that adopted nothing is not repeated for CATCH_UP_BACKOFF_S,
doubling up to CATCH_UP_MAX_S: a liar costs at most one download per DISTRUST_S.
"""

from __future__ import annotations

import logging
import random
import shutil
import time

from node.session import fetch_replica, replica_settings
from node.state import StateDir
from nord.checks import is_count
from nord.config import RunConfig
from nord.crdt import Replica
from nord.errors import TransportError
from nord.gossip import hello
from nord.transport import Transport

log = logging.getLogger(__name__)

DISTRUST_S = 600.0  # a peer whose state failed verification (or was not newer) is not asked this long
CATCH_UP_BACKOFF_S = 30.0  # after a pass that adopted nothing, `behind` is ignored this long ...
CATCH_UP_MAX_S = 600.0  # ... doubling up to this
SNAPSHOT_CANDIDATES = 3  # peers asked for their round in one pass


class CatchUp:
    """Finds, verifies and stages a newer sealed state for one worker's replica."""

    def __init__(self, run: RunConfig, transport: Transport, state: StateDir) -> None:
        self.run, self.transport, self.state = run, transport, state
        self.distrusted: dict[str, float] = {}  # peer id -> monotonic time until which it is not asked
        self._backoff = CATCH_UP_BACKOFF_S
        self._next = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def fetch_newer(self, peers: list[str], mine: int) -> bool:
        """Stage (in `replica.new/`) the verified snapshot of a random peer whose round is past `mine`;
        False, and back off, if none of the peers asked has one."""
        now = time.monotonic()
        candidates = [p for p in peers if self.distrusted.get(p, 0.0) <= now]
        for peer in random.sample(candidates, min(SNAPSHOT_CANDIDATES, len(candidates))):
            try:
                claimed = hello(self.transport, peer, self.run.run_id).get("round")
            except TransportError:
                continue
            if not is_count(claimed) or claimed <= mine:
                continue  # nothing newer to gain from this one
            shutil.rmtree(self.state.incoming_replica_dir, ignore_errors=True)
            try:
                fresh = fetch_replica(self.run, self.transport, peer, self.state.incoming_replica_dir)
            except TransportError as e:
                self.distrust(peer, str(e))
                continue
            fresh.close()
            if fresh.round <= mine:
                shutil.rmtree(self.state.incoming_replica_dir, ignore_errors=True)
                self.distrust(
                    peer, f"it claimed round {claimed}, its sealed snapshot is of round {fresh.round}"
                )
                continue
            log.warning(
                "replica behind the peers' compaction point: round %d verified from peer %s (was %d)",
                fresh.round,
                peer[-8:],
                mine,
            )
            self._backoff = CATCH_UP_BACKOFF_S
            return True
        log.info(
            "a peer says this replica is behind, but no peer asked had a newer verified state; "
            "not looking again for %.0f s",
            self._backoff,
        )
        self._next = now + self._backoff
        self._backoff = min(2 * self._backoff, CATCH_UP_MAX_S)
        return False

    def swap_in(self) -> Replica:
        """Make the staged replica the worker's (call with the old one closed, under the gossip lock)."""
        self.state.swap_replica()
        return Replica.open(self.state.replica_dir, **replica_settings(self.run))

    def distrust(self, peer: str, why: str) -> None:
        """Do not ask `peer` for state for DISTRUST_S; one warning per period."""
        self.distrusted[peer] = time.monotonic() + DISTRUST_S
        log.warning("not trusting peer %s's state for %.0f s: %s", peer[-8:], DISTRUST_S, why)
