"""Errors and logs name other peers as docs/volunteer.md says: by signing-key fingerprint only when a
hello proved the key (signed over the run and the network id we dialled), otherwise as
`network peer <8 characters after the libp2p prefix>…`, never a bare piece of the network id."""

from __future__ import annotations

import pytest
import torch

from node.peers import PeerNames, hello_key
from node.session import find_run
from nord.crdt import MergeConfig, Replica
from nord.errors import TransportError
from nord.gossip import Gossip
from nord.gossip.wire import hello_binding
from nord.identity import Identity
from nord.transport import Transport, TransportConfig
from nord.transport.peer import network_peer

RUN = "names-run"
KEY = Identity.from_private_bytes(bytes([7]) * 32)
OTHER = Identity.from_private_bytes(bytes([8]) * 32)
QM_ID = "QmZqWdarUY7R8ntSuKJvTJGDmtzasj8YkP4Q39sZoZmXv8"  # a peer id no node here has
ED_ID = "12D3KooWGzh5Xr4vYx9ZbGfJ3uF7uKp1mDbCqoHvS3nTq2gq8aBc"


def test_a_network_id_is_labelled_and_shown_after_its_common_prefix():
    assert network_peer(QM_ID) == "network peer ZqWdarUY…"
    assert network_peer(ED_ID) == "network peer Gzh5Xr4v…"


def signed_hello(identity: Identity, network_id: str, run: str = RUN) -> dict:
    return {"key": identity.public_hex, "binding": identity.sign(hello_binding(run, network_id))}


def test_only_a_hello_signed_for_that_network_id_and_run_names_a_peer_by_its_key():
    assert hello_key(signed_hello(KEY, QM_ID), RUN, QM_ID) == KEY.public_hex
    assert hello_key(signed_hello(KEY, ED_ID), RUN, QM_ID) is None  # replayed by another network id
    assert hello_key(signed_hello(KEY, QM_ID, "other-run"), RUN, QM_ID) is None
    forged = {**signed_hello(OTHER, QM_ID), "key": KEY.public_hex}  # someone else's key claimed
    assert hello_key(forged, RUN, QM_ID) is None
    assert hello_key({"key": KEY.public_hex}, RUN, QM_ID) is None  # unsigned, as a presence record
    names = PeerNames(RUN)
    names.learn(QM_ID, forged)
    assert names(QM_ID) == "network peer ZqWdarUY…"
    names.learn(QM_ID, signed_hello(KEY, QM_ID))
    assert names(QM_ID) == f"peer {KEY.fingerprint}"


@pytest.fixture
def server_and_client():
    """A peer serving RUN (signing key KEY) and a joining peer, on 127.0.0.1."""
    server = Transport.start(TransportConfig(local_only=True))
    client = Transport.start(
        TransportConfig(local_only=True, initial_peers=tuple(server.visible_maddrs()), request_timeout_s=20)
    )
    replica = Replica(
        run_id=RUN,
        spec={"w": (4,)},
        base={"w": torch.zeros(4)},
        merge=MergeConfig(),
        authorities=[KEY.public_key],
    )
    gossip = Gossip(server, replica, '{"run_id": "names-run"}', role="coordinator", identity=KEY)
    gossip.serve()
    yield server, client
    gossip.close()
    client.shutdown()
    server.shutdown()


def expected_label(peer_id: str) -> str:
    body = peer_id.removeprefix("12D3KooW") if peer_id.startswith("12D3KooW") else peer_id.removeprefix("Qm")
    return f"network peer {body[:8]}…"


@pytest.mark.p2p
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wrong_run_and_unreachable_peer_errors_name_the_peer_by_its_labelled_network_id(server_and_client):
    server, client = server_and_client
    with pytest.raises(TransportError) as wrong_run:
        find_run(client, (server.peer_id,), "another-run")
    assert f"{expected_label(server.peer_id)}: run 'another-run' not found" in str(wrong_run.value)

    with pytest.raises(TransportError) as unreachable:
        find_run(client, (QM_ID,), RUN)
    assert str(unreachable.value).startswith("network peer ZqWdarUY… "), unreachable.value

    names = PeerNames(RUN)
    assert find_run(client, (server.peer_id,), RUN, names) == server.peer_id
    assert names(server.peer_id) == f"peer {KEY.fingerprint}"  # its hello proved its key
