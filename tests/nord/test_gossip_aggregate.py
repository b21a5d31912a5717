"""Following the seals from aggregates over real peers on 127.0.0.1 (nord.gossip.aggregates, #19).

Workers with adopt="aggregate" push their contribution to the bootstrap peer only, learn the seal by a
seals-only sync, and adopt it from the round's aggregate; a holder that announces itself and serves a
forged aggregate is refused, not asked again, and the seal is adopted from an honest holder.
"""

from __future__ import annotations

import msgpack
import pytest
from crdt_support import AUTHORITY, RUN, envelope
from test_gossip import swarm, wait_until  # noqa: F401 (the fixture)

from nord.crdt.aggregate import Aggregate
from nord.errors import TransportError

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(180)]


def test_workers_adopt_the_seal_from_its_aggregate_and_refuse_a_forger(swarm, caplog):  # noqa: F811
    boot, liar, public, client = swarm
    public.adopt = client.adopt = "aggregate"
    base = boot.replica.base_hash
    mine = {}
    for i, g in enumerate((public, client)):
        env = mine[g] = envelope(i, 0, base)
        with g.lock:
            g.replica.add(env)
        assert g.publish(env) == 1  # to the bootstrap peer only
    with boot.lock:
        boot.replica.add(envelope(2, 0, base))
        seal = boot.replica.seal(AUTHORITY)
        parts = boot.replica.aggregate_parts()
    assert not public.replica.has(mine[client].contribution_id)  # nobody but the bootstrap gathered them

    # The liar announces itself as the holder of round 0's aggregate and serves a well-formed one of
    # other weights (one value changed) under the real seal.
    _, window, before, after = parts
    name = sorted(after)[0]
    wrong = {**after, name: after[name].clone()}
    wrong[name].view(-1)[0] += 1.0
    liar.aggregates.serve = lambda req: Aggregate.build(seal, window, before, wrong).to_bytes()
    me = liar.transport.peer_id
    liar.transport.store_record(f"nord/{RUN}/aggregate/0", me, {"seal": seal.seal_id, "holder": me}, 600)

    for g in (public, client):
        assert wait_until(lambda g=g: (g.anti_entropy(), g.replica.round)[1] == 1, 120)
        assert g.replica.base_hash == boot.replica.base_hash == seal.weights_hash
        assert g.replica.contributions() == []  # adopted without the others' contributions
        if g is public:  # the only announced holder then was the liar: tried first, refused
            assert me in g.aggregates._distrusted
            assert "not asking" in caplog.text and "does not give the weights" in caplog.text
    # The public worker announced itself as a holder; the client-mode one could not be dialed.
    holders = set(client.transport.get_records(f"nord/{RUN}/aggregate/0"))
    assert public.transport.peer_id in holders and client.transport.peer_id not in holders


def test_seals_only_syncs_and_bad_aggregate_requests(swarm):  # noqa: F811
    boot, public_a, public_b, client = swarm
    env = envelope(0, 0, boot.replica.base_hash)
    with boot.lock:
        boot.replica.add(env)
        seal = boot.replica.seal(AUTHORITY)
    client.adopt = "aggregate"
    client.sync_with(boot.transport.peer_id)
    assert [s.seal_id for s in client.replica.waiting_seals()] == [seal.seal_id]
    assert not client.replica.has(env.contribution_id)  # the seal came, its contribution did not
    ask = client.transport.request
    for body, error in [
        ({"run_id": RUN, "round": "0"}, "round must be a non-negative integer"),
        ({"run_id": RUN, "round": 5}, "holds no aggregate of round 5"),
        ({"run_id": RUN, "digest": {}, "contributions": "no"}, None),
    ]:
        handler = "sync" if "digest" in body else "aggregate"
        error = error or "contributions must be true or false"
        with pytest.raises(TransportError, match=error):
            ask(boot.transport.peer_id, handler, msgpack.packb(body, use_bin_type=True))


def test_a_peer_that_gathers_contributions_does_not_push_them_to_one_that_follows_seals(swarm):  # noqa: F811
    boot, public, _, _ = swarm
    public.adopt = "aggregate"
    others = [envelope(i, 0, boot.replica.base_hash) for i in range(3)]
    with boot.lock:
        for env in others:
            boot.replica.add(env)
    mine = envelope(4, 0, boot.replica.base_hash)
    with public.lock:
        public.replica.add(mine)
    boot.sync_with(public.transport.peer_id)  # the coordinator's periodic sync with a public worker
    assert not any(public.replica.has(e.contribution_id) for e in others)
    public.sync_with(boot.transport.peer_id)  # ours still reaches the peer that gathers them
    assert boot.replica.has(mine.contribution_id)
