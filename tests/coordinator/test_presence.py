"""Presence records in the DHT that name a signing key fill in the peers table's mode and device."""

from __future__ import annotations

import pytest

from coordinator.history import History
from coordinator.liveness import Liveness
from nord.transport import Transport, TransportConfig

pytestmark = [pytest.mark.p2p, pytest.mark.timeout(120)]


def test_presence_with_key_sets_mode_and_device(tmp_path):
    history = History.open(tmp_path / "h.sqlite")
    key = "ab" * 32
    transport = Transport.start(TransportConfig(local_only=True))
    try:
        peers = "nord/presence-test/peers"
        transport.store_record(
            peers,
            "QmWorker",
            {"role": "worker", "client_mode": True, "key": key, "device": "cuda:Tesla T4"},
            60,
        )
        transport.store_record(
            peers, "QmOld", {"role": "worker", "client_mode": False}, 60
        )  # no key: skipped
        transport.store_record(peers, "QmBad", {"key": "not hex", "device": "x"}, 60)
        assert Liveness(history).sync_presence(transport, "presence-test") == 1
    finally:
        transport.shutdown()
    (row,) = history.peers()
    assert (row["peer"], row["mode"], row["device"]) == (key, "client", "cuda:Tesla T4")
    history.close()
