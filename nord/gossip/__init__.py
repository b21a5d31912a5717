"""Gossip: the anti-entropy protocol that makes the replicas of one run converge, over `nord.transport`.

Every peer (worker or coordinator) serves these request handlers; requests and replies are msgpack maps
and every request names its run, so a peer of another run answers "run ... not found" in one line:

    hello      {run_id} -> {run_id, role, client_mode, round, base_hash, key?, binding?: key's signature of
               hello_binding(run, the answering peer id), when the peer has a signing key}
    config     {run_id} -> the RunConfig JSON
    sync       {run_id, digest, contributions?: false for seals and removals only} -> {delta: what the
               caller lacks (Delta bytes, at most SYNC_BUDGET_BYTES of envelopes; `more` says to ask
               again), digest: the server's digest, behind: caller is older than the server's
               compaction point (fetch a snapshot), contributions: whether the server gathers them
               (false: the caller's push after the sync carries no contributions)}
    push       {run_id, delta} -> {accepted}
    fetch      {run_id, ids: at most MAX_FETCH_IDS contribution ids} -> {delta: those contributions}
    snapshot   {run_id} -> safetensors bytes of the sealed tip (`Replica.save_snapshot`)
    aggregate  {run_id, round} -> `Aggregate` bytes of that sealed round (nord.gossip.aggregates)
    tokenizer  {run_id} -> tokenizer.json bytes

Every field of every request is checked (type, shape, list lengths) before use: a malformed request
gets a one-line error that names the field, and only NordError leaves a handler.

One exchange with peer P, started by either side (so client-mode peers, which nobody can dial, take
part): `sync` brings what P has and we lack, then `push` sends what P lacks by P's digest. New
contributions are also pushed at once to every reachable peer (with adopt="auto"/"aggregate", the
worker default, to the bootstrap peers only: nord.gossip.aggregates) and announced in the DHT:

    nord/<run>/peers              subkey <peer id>         {role, client_mode, key?, device?}  (presence)
    nord/<run>/contrib/<round>    subkey <cid>/<holder>    {cid, round, size, holder}
    nord/<run>/aggregate/<round>  subkey <holder>          {seal, holder}   (adopt="auto"/"aggregate")

so a peer that sees a record for a contribution it lacks pulls it from any holder, not only its author.
Only small records go to the DHT; payloads travel on streams.

Thread safety: handlers run in transport threads. Everything here takes `Gossip.lock` around the replica;
owners (worker, coordinator) must hold it too whenever they touch the replica.

Public API (stable):
    Gossip(transport, replica, run_config_json, role=, bootstrap_peers=, tokenizer_path=, on_update=,
           presence=, on_heard=, identity=, adopt=)
        .serve()                       register the handlers, announce presence
        .heartbeat()                   refresh presence (every ~PEER_TTL_S / 3)
        .lock                          RLock guarding .replica
        .publish(envelope) -> int      announce + push our contribution (already added) to reachable peers
        .publish_seal(seal) / .publish_removal(removal) -> int
        .sync_with(peer) -> (accepted, behind)      .pull_announced(rounds) -> accepted
        .anti_entropy(fanout=2) -> (accepted, behind)
        .peers() / .reachable_peers()  .close()
    hello(transport, peer, run_id) -> dict          (RunNotFound)
    fetch_run_config_json(transport, peer, run_id) -> str
    fetch_snapshot(transport, peer, run_id, out_path, max_bytes=snapshot_max_bytes(model)) -> Path
    fetch_tokenizer(transport, peer, run_id) -> bytes

Files: wire.py (limits, msgpack/Delta helpers, the joining peer's calls), service.py (Gossip).
"""

from nord.gossip.service import Gossip
from nord.gossip.wire import (
    PEER_TTL_S,
    RunNotFound,
    fetch_run_config_json,
    fetch_snapshot,
    fetch_tokenizer,
    hello,
    snapshot_max_bytes,
)

__all__ = [
    "PEER_TTL_S",
    "Gossip",
    "RunNotFound",
    "fetch_run_config_json",
    "fetch_snapshot",
    "fetch_tokenizer",
    "hello",
    "snapshot_max_bytes",
]
