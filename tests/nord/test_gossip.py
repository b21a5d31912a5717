"""nord.gossip on 127.0.0.1: replicas of real peers (one in client mode) converge by push and anti-entropy."""

from __future__ import annotations

import time

import msgpack
import pytest
from crdt_support import AUTHORITY, PEERS, RUN, envelope, fingerprint, make_replica
from lock_probe import probe_lock_during

import nord.crdt.persistence
from nord.checkpoint import load_checkpoint
from nord.crdt import Delta
from nord.errors import TransportError
from nord.gossip import Gossip, RunNotFound, fetch_run_config_json, fetch_snapshot, hello
from nord.transport import Transport, TransportConfig

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(180)]

CONFIG_JSON = '{"run_id": "crdt-test"}'


@pytest.fixture
def swarm():
    """A bootstrap/authority peer, two public workers and one client-mode worker, each with a replica."""
    boot = Transport.start(TransportConfig(local_only=True))
    initial = tuple(boot.visible_maddrs())
    transports = [boot] + [
        Transport.start(TransportConfig(local_only=True, initial_peers=initial, client_mode=(i == 2)))
        for i in range(3)
    ]
    gossips = []
    for i, t in enumerate(transports):
        g = Gossip(
            t,
            make_replica(),
            CONFIG_JSON,
            role="coordinator" if i == 0 else "worker",
            bootstrap_peers=(boot.peer_id,),
        )
        g.serve()
        gossips.append(g)
    yield gossips
    for g in gossips:
        g.close()
        g.transport.shutdown()


def wait_until(cond, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_contributions_and_seals_reach_every_replica(swarm):
    boot, public_a, public_b, client = swarm
    base = boot.replica.base_hash
    for i, g in enumerate(swarm[1:]):
        env = envelope(i, 0, base)
        with g.lock:
            assert g.replica.add(env)
        g.publish(env)
    # public peers received every push at once; the client-mode peer catches up by pulling
    client.anti_entropy(fanout=3)
    with boot.lock:
        seal = boot.replica.seal(AUTHORITY)
    boot.publish_seal(seal)
    for g in swarm[1:]:
        assert wait_until(lambda g=g: (g.anti_entropy(), g.replica.round)[1] == 1)
    prints = {fingerprint(g.replica) for g in swarm}
    assert len(prints) == 1
    assert len(boot.replica.seals()[0].contribution_ids) == 3


def test_a_contribution_is_pulled_from_a_holder_other_than_its_author(swarm):
    boot, public_a, public_b, client = swarm
    env = envelope(4, 0, boot.replica.base_hash)
    with public_a.lock:
        public_a.replica.add(env)
    public_a.publish(env)
    assert boot.replica.has(env.contribution_id)
    key = f"nord/{RUN}/contrib/0"
    assert wait_until(lambda: len(client.transport.get_records(key)) >= 3)  # author + the two it pushed to
    public_a.transport.shutdown()  # the author leaves; boot and public_b still hold it
    assert client.pull_announced(range(0, 1)) == 1
    assert client.replica.has(env.contribution_id)


def test_joining_peer_gets_config_and_snapshot_and_wrong_run_is_refused(swarm, tmp_path):
    boot = swarm[0]
    joiner = swarm[3].transport
    assert hello(joiner, boot.transport.peer_id, RUN)["role"] == "coordinator"
    assert fetch_run_config_json(joiner, boot.transport.peer_id, RUN) == CONFIG_JSON
    with pytest.raises(TransportError):  # a reply past the model's budget is cut, never taken whole
        fetch_snapshot(joiner, boot.transport.peer_id, RUN, tmp_path / "cut.safetensors", max_bytes=1024)
    assert not (tmp_path / "cut.safetensors").exists()
    path = fetch_snapshot(
        joiner, boot.transport.peer_id, RUN, tmp_path / "snap.safetensors", max_bytes=1 << 30
    )
    tensors, meta = load_checkpoint(path)
    assert meta["run_id"] == RUN and int(meta["base_round"]) == 0
    with pytest.raises(RunNotFound, match="run 'other' not found on this peer"):
        hello(joiner, boot.transport.peer_id, "other")


def test_garbage_and_forged_pushes_are_rejected_without_harm(swarm):
    boot, public_a = swarm[0], swarm[1]
    with pytest.raises(TransportError, match="not valid msgpack"):
        public_a.transport.request(boot.transport.peer_id, "push", b"\xc1garbage")
    forged = envelope(0, 0, boot.replica.base_hash).to_bytes()
    forged = forged[:-5] + bytes(5)  # break the signature
    body = msgpack.packb({"run_id": RUN, "delta": Delta(envelopes=(forged,)).to_bytes()}, use_bin_type=True)
    reply = msgpack.unpackb(public_a.transport.request(boot.transport.peer_id, "push", body))
    assert reply == {"accepted": 0}
    assert boot.replica.contributions() == []
    assert PEERS  # the identities used above are the shared fixtures'


TYPE_CONFUSED = [  # (handler, request, what the error says)
    ("fetch", {"run_id": RUN, "ids": 5}, "ids must be a list of at most 4096 contribution ids"),
    ("fetch", {"run_id": RUN, "ids": True}, "got bool"),
    ("fetch", {"run_id": RUN, "ids": [[1]]}, "got a list of length 1"),
    ("fetch", {"run_id": RUN, "ids": ["0" * 64] * 4097}, "got a list of length 4097"),
    ("fetch", {"run_id": RUN}, "got nothing"),
    ("hello", {"run_id": [RUN]}, "hello request: run_id is not a run id"),
    ("sync", {"run_id": RUN, "digest": {"round": "x"}}, "malformed anti-entropy digest"),
    ("push", {"run_id": RUN, "delta": 7}, "message carries no delta"),
    ("push", {"run_id": RUN, "delta": b"\x93\x01"}, "nord.delta"),
]


def test_type_confused_requests_get_a_specific_error(swarm, caplog):
    """The issue's probe was `fetch` with ids = 5, true or [[1]]: an internal error and a traceback."""
    boot, public_a = swarm[0], swarm[1]
    for name, fields, message in TYPE_CONFUSED:
        with pytest.raises(TransportError, match=message) as refused:
            public_a.transport.request(boot.transport.peer_id, name, msgpack.packb(fields, use_bin_type=True))
        assert "internal error" not in str(refused.value)
    assert not [r for r in caplog.records if r.exc_info], "a handler let a non-NordError escape"


def test_the_snapshot_budget_holds_a_real_models_snapshot_and_little_more(tmp_path):
    from nord.checkpoint import save_checkpoint
    from nord.gossip.wire import SNAPSHOT_META_BYTES, snapshot_max_bytes
    from nord.model import NordLM
    from nord.recipes import get_config

    cfg = get_config("tiny")
    weights = {k: v.float() for k, v in NordLM(cfg).state_dict().items()}
    save_checkpoint(tmp_path / "w.safetensors", weights)
    size = (tmp_path / "w.safetensors").stat().st_size
    assert size < snapshot_max_bytes(cfg) <= size + SNAPSHOT_META_BYTES + 4096


def test_the_gossip_lock_is_free_while_a_snapshot_is_serialised(swarm, tmp_path, monkeypatch):
    """A snapshot is a whole model: written under the lock it stalled every handler of the peer."""
    boot, joiner = swarm[0], swarm[3].transport
    served = probe_lock_during(monkeypatch, nord.crdt.persistence, "save_checkpoint", boot.lock)
    for attempt in range(2):  # the second is served from the cache: no second serialisation
        path = tmp_path / f"snap-{attempt}.safetensors"
        fetch_snapshot(joiner, boot.transport.peer_id, RUN, path, max_bytes=1 << 30)
        assert load_checkpoint(path)[1]["base_round"] == "0"
    assert served == [True], "a handler waited for the gossip lock until the snapshot was written"
