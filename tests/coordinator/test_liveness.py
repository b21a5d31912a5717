"""Liveness on 127.0.0.1: a request from a peer counts as hearing from it, under the signing key its DHT
presence record names (real transports, a real Gossip with the `on_heard` hook, a real history)."""

from __future__ import annotations

import pytest
import torch

from coordinator.history import History
from coordinator.liveness import Liveness
from nord.crdt import MergeConfig, Replica
from nord.gossip import Gossip, hello
from nord.transport import Transport, TransportConfig

pytestmark = [pytest.mark.p2p, pytest.mark.timeout(180)]

RUN = "liveness-test"
KEY = "cd" * 32


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_request_is_heard_under_the_key_of_its_presence_record(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    clock = Clock(100.0)
    liveness = Liveness(history, clock=clock)
    replica = Replica(
        run_id=RUN, spec={"w": (4,)}, base={"w": torch.zeros(4)}, merge=MergeConfig(), authorities=[]
    )
    coordinator = Transport.start(TransportConfig(local_only=True))
    worker = Transport.start(
        TransportConfig(local_only=True, initial_peers=tuple(coordinator.visible_maddrs()), client_mode=True)
    )
    gossip = Gossip(
        coordinator, replica, f'{{"run_id": "{RUN}"}}', role="coordinator", on_heard=liveness.heard
    )
    gossip.serve()
    try:
        hello(worker, coordinator.peer_id, RUN)
        assert liveness.flush() == 0  # heard, but whose key that peer id is stays unknown until presence
        worker.store_record(f"nord/{RUN}/peers", worker.peer_id, {"client_mode": True, "key": KEY}, 60)
        assert liveness.sync_presence(coordinator, RUN) == 1
        (row,) = history.peers()
        assert (row["peer"], row["mode"], row["last_seen"]) == (KEY, "client", 100.0)
        clock.now = 130.0
        hello(worker, coordinator.peer_id, RUN)
        assert liveness.flush() == 1
        assert history.peers()[0]["last_seen"] == 130.0
        clock.now = 130.0 + 61
        assert liveness.flush() == 0  # nothing heard since: last_seen stays the time of the last request
        assert history.peers()[0]["last_seen"] == 130.0
    finally:
        gossip.close()
        worker.shutdown()
        coordinator.shutdown()
        history.close()
