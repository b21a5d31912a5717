"""A hostile contributor built from Nord's own library: it joins a real run like a worker — its own
signing key, presence record, replica and gossip handlers — and publishes poisoned contributions (#17).

    python tests/security/contribution_peer.py --initial-peers MADDR --run RUN --state-dir DIR

It follows the run through its replica (honest workers push their contributions to it as to any peer)
and attacks one round at a time, in this order; those meant for the authority are sent again in a later
round until it has judged them (a contribution that misses its round's seal is only "too old"):

    benign        one value of 1e-4 at a coordinate the round's honest contribution leaves alone, sent
                  once the coordinator holds the honest one, until a seal folds it (the sealed
                  contribution of its own that `replay-own` sends again)
    nan, inf      an honest worker's delta, signed by this peer, with one NF4 block scale set to fp16 NaN
                  / +Inf (a payload has no other way to carry one: a value is an NF4 code × its block's
                  fp16 scale), hashed and signed correctly
    replay-own    its sealed `benign`, byte for byte; in the same round as nan and inf
    replay-honest the honest contribution that seal folded, byte for byte
    replay-stale-base  the `benign` payload signed again for the open round, naming its old base
    scaled        the honest delta × 1000, signed by this peer for the open round
    fp16-max      the honest delta with every block scale at 65504 (the largest finite fp16): values up
                  to 65504, as close to Inf as a decodable payload gets
    equivocation  two different contributions (the honest delta × 1 and × 0.5) for one round, one push
    banned        a `benign` contribution once the authority should have banned it

Single contributions go out through `Gossip.publish`, the path of a worker's contributions (announce in
the DHT, push to every reachable peer); the equivocating pair in one gossip `push`. After each attack it
writes DIR/attacks.json: per attack the round, contribution ids, how many peers accepted the push, and
what came back (the authority's removal reasons, or "sealed"); "done": true once all are through. It
runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import msgpack
import torch
from hostile_peer import loopback_peer_args

from node.session import model_spec, open_replica, start_transport
from nord.codec import DeltaEncoder
from nord.codec.envelope import Envelope, seal_envelope
from nord.codec.payload import pack_payload
from nord.config import RunConfig
from nord.crdt import Delta
from nord.errors import TransportError
from nord.fsutil import atomic_write_bytes
from nord.gossip import Gossip, fetch_run_config_json
from nord.gossip.wire import PUSH_TIMEOUT_S, SMALL_REQUEST_BYTES, pack, unpack
from nord.identity import Identity

SCALE = 1000.0
BENIGN_VALUE = 1e-4
FP16 = {"nan": 0x7E00, "inf": 0x7C00, "fp16-max": 0x7BFF}  # bit patterns of fp16 NaN, +Inf, 65504
MAX_TRIES = 4  # rounds an attack is retried in before the peer gives up on it (a missed round is a race)
POLL_S = 0.2


class Hostile:
    def __init__(self, args: argparse.Namespace) -> None:
        self.state = Path(args.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.transport = start_transport(args, self.state / "p2p.key")
        self.me = Identity.load_or_create(self.state / "identity.key")
        self.coordinator = args.initial_peers[0].rsplit("/p2p/", 1)[1]
        run_json = fetch_run_config_json(self.transport, self.coordinator, args.run)
        self.run = RunConfig.from_json(run_json)
        self.run.verify(None)  # signed by the authority it names (the honest workers check the same)
        self.spec = model_spec(self.run)
        replica = open_replica(
            self.run, self.state / "replica", transport=self.transport, source=self.coordinator
        )
        self.gossip = Gossip(self.transport, replica, run_json, bootstrap_peers=(self.coordinator,),
                             presence={"key": self.me.public_hex})  # fmt: skip
        self.honest: dict[int, Envelope] = {}  # round -> an honest peer's contribution seen for it
        self.report: dict = {"attacks": [], "done": False}
        self.acted = -1  # the last round attacked

    # ---- following the run -------------------------------------------------------------------------

    @property
    def replica(self):
        return self.gossip.replica

    def pump(self, until, timeout_s: float = 600.0):
        """Anti-entropy (and remembering honest contributions) until `until()` is truthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.gossip.anti_entropy(fanout=2)
            with self.gossip.lock:
                for _, env in self.replica.contributions():
                    if env.peer_key != self.me.public_key:
                        self.honest.setdefault(int(env.round), env)
            if value := until():
                return value
            time.sleep(POLL_S)
        raise TimeoutError("the run made no progress")

    def open_round(self) -> tuple[int, str]:
        with self.gossip.lock:
            return self.replica.round, self.replica.base_hash

    def fresh_round(self) -> tuple[int, str]:
        """Wait for a round opened after the last one attacked (so one attack goes to one round)."""
        self.pump(lambda: self.open_round()[0] > self.acted)
        self.acted, base = self.open_round()
        return self.acted, base

    def sealed(self, rnd: int) -> tuple[str, ...] | None:
        """The ids round `rnd`'s seal folded, once this replica holds it."""
        with self.gossip.lock:
            seal = next((s for s in self.replica.seals() if s.round == rnd), None)
        return seal.contribution_ids if seal else None

    def removal_reasons(self, cids: list[str]) -> dict[str, str]:
        with self.gossip.lock:
            reasons = {r.contribution_id: r.reason for r in self.replica.removals()}
        return {c: reasons[c] for c in cids if c in reasons}

    def coordinator_holds(self, cid: str) -> bool:
        body = pack({"run_id": self.run.run_id, "ids": [cid]})
        reply = unpack(
            self.transport.request(self.coordinator, "fetch", body, max_reply_bytes=1 << 26), "fetch"
        )
        return bool(Delta.from_bytes(reply["delta"]).envelopes)

    # ---- building contributions --------------------------------------------------------------------

    def sign(self, rnd: int, base: str, names, payload: bytes) -> Envelope:
        shapes = tuple(self.spec[n] for n in names)
        return seal_envelope(
            run_id=self.run.run_id, round=rnd, base_hash=base, names=tuple(names), shapes=shapes,
            payload=payload, identity=self.me,
        )  # fmt: skip

    def encode(self, dense: dict[str, torch.Tensor], rnd: int, base: str) -> Envelope:
        return DeltaEncoder(self.run.codec, self.spec).encode(
            dense, run_id=self.run.run_id, round=rnd, base_hash=base, identity=self.me
        )

    def scaled(self, honest: Envelope, factor: float, rnd: int, base: str) -> Envelope:
        """The honest contribution's delta × `factor`, encoded and signed by this peer."""
        dense = {}
        for name, sparse in honest.delta().items():
            flat = torch.zeros(self.spec[name]).reshape(-1)
            flat[sparse.indices] = sparse.values * factor
            dense[name] = flat.reshape(self.spec[name])
        return self.encode(dense, rnd, base)

    def with_scales(self, env: Envelope, bits: int, every: bool) -> Envelope:
        """`env`'s payload with its first block scale (`every`: all of them) set to the fp16 `bits`,
        hashed and signed again: a well-formed, correctly signed envelope carrying that value."""
        blocksize, entries = msgpack.unpackb(env.payload, raw=False)
        for entry in entries if every else entries[:1]:
            scales = entry[6]
            blocks = len(scales) // 2 if every else 1
            entry[6] = bits.to_bytes(2, "little") * blocks + scales[2 * blocks :]
        return self.sign(env.round, env.base_hash, env.names, pack_payload(blocksize, entries))

    def benign(self, honest: Envelope, rnd: int, base: str) -> Envelope:
        """One tiny value in the smallest tensor, at a coordinate `honest` leaves alone."""
        name = min(self.spec, key=lambda n: (torch.Size(self.spec[n]).numel(), n))
        touched = set(honest.delta()[name].indices.tolist()) if name in honest.names else set()
        flat = torch.zeros(self.spec[name]).reshape(-1)
        flat[next(i for i in range(flat.numel()) if i not in touched)] = BENIGN_VALUE
        return self.encode({name: flat.reshape(self.spec[name])}, rnd, base)

    # ---- publishing --------------------------------------------------------------------------------

    def push_together(self, envelopes: list[Envelope]) -> int:
        """One gossip `push` carrying all of `envelopes` to every reachable peer; peers that accepted."""
        body = pack(
            {
                "run_id": self.run.run_id,
                "delta": Delta(envelopes=tuple(e.to_bytes() for e in envelopes)).to_bytes(),
            }
        )
        reached = 0
        for peer in self.gossip.reachable_peers():
            try:
                reply = self.transport.request(
                    peer, "push", body, max_reply_bytes=SMALL_REQUEST_BYTES, timeout_s=PUSH_TIMEOUT_S
                )
            except TransportError:
                continue
            reached += int(bool(unpack(reply, "push").get("accepted")))
        return reached

    def send(self, attack: str, rnd: int, envelopes: list[Envelope], tries: int = 1) -> dict:
        reached = self.gossip.publish(envelopes[0]) if len(envelopes) == 1 else self.push_together(envelopes)
        entry = {"attack": attack, "round": rnd, "cids": [e.contribution_id for e in envelopes],
                 "reached": reached, "tries": tries, "outcome": None}  # fmt: skip
        self.report["attacks"].append(entry)
        self.save()
        print(
            f"{attack}: round {rnd}, {len(envelopes)} contribution(s), accepted by {reached} peer(s)",
            flush=True,
        )
        return entry

    def save(self) -> None:
        atomic_write_bytes(self.state / "attacks.json", json.dumps(self.report, indent=1).encode())

    def judged(self, entry: dict) -> bool:
        """Wait for the authority's removal of every contribution of `entry` (or a seal folding one),
        at most until the round after the attacked one is sealed; record what came back. A removal can
        come too late to be seen: once its round is sealed, a replica drops the contributions that round
        can no longer fold, removals with them; the attack is then sent again (the test reads the
        verdicts from the coordinator's history)."""
        rnd, cids = entry["round"], entry["cids"]

        def outcome():
            reasons = self.removal_reasons(cids)
            if len(reasons) == len(cids):
                return sorted(set(reasons.values()))
            if any(c in (self.sealed(rnd) or ()) for c in cids):
                return ["sealed"]
            return "missed" if self.sealed(rnd + 1) is not None else None

        result = self.pump(outcome)
        entry["outcome"] = None if result == "missed" else result
        self.save()
        return entry["outcome"] is not None

    def retried(self, attack: str, build) -> dict:
        """Send `build(round, base)` in fresh rounds until the authority has judged it."""
        for tries in range(1, MAX_TRIES + 1):
            rnd, base = self.fresh_round()
            entry = self.send(attack, rnd, build(rnd, base), tries)
            if self.judged(entry):
                return entry
        raise TimeoutError(f"{attack}: never reached the authority in {MAX_TRIES} rounds")

    # ---- the attacks -------------------------------------------------------------------------------

    def attack(self) -> None:
        benign, honest_sealed = self.sealed_benign()
        source = self.honest[max(self.honest)]  # an honest delta to scale, poison and copy
        rnd, base = self.fresh_round()  # contributions no peer should even hold, before any rejection
        plain = self.scaled(source, 1.0, rnd, base)
        refused = {
            "nan": self.with_scales(plain, FP16["nan"], every=False),
            "inf": self.with_scales(plain, FP16["inf"], every=False),
            "replay-own": benign,
            "replay-honest": honest_sealed,
            "replay-stale-base": self.sign(rnd, benign.base_hash, benign.names, benign.payload),
        }
        for attack, env in refused.items():
            self.send(attack, rnd, [env])
        self.retried("scaled", lambda r, b: [self.scaled(source, SCALE, r, b)])
        self.retried(
            "fp16-max",
            lambda r, b: [self.with_scales(self.scaled(source, 1.0, r, b), FP16["fp16-max"], every=True)],
        )
        self.retried(
            "equivocation", lambda r, b: [self.scaled(source, 1.0, r, b), self.scaled(source, 0.5, r, b)]
        )
        self.retried("banned", lambda r, b: [self.benign(source, r, b)])
        self.report["done"] = True
        self.save()

    def sealed_benign(self) -> tuple[Envelope, Envelope]:
        """Send `benign` once the coordinator holds the round's honest contribution, until a seal folds
        it; returns it and the honest contribution that seal folded."""
        for tries in range(1, 3 * MAX_TRIES + 1):
            rnd, base = self.fresh_round()

            def ready(r=rnd):
                moved_on = self.open_round()[0] > r
                return moved_on or (
                    r in self.honest and self.coordinator_holds(self.honest[r].contribution_id)
                )

            self.pump(ready)
            if self.open_round()[0] > rnd:
                continue  # sealed before we could join it: try the next round
            envelope = self.benign(self.honest[rnd], rnd, base)
            entry = self.send("benign", rnd, [envelope], tries)
            folded = self.pump(lambda r=rnd: self.sealed(r))
            entry["outcome"] = ["sealed"] if envelope.contribution_id in folded else None
            self.save()
            if entry["outcome"]:
                return envelope, self.honest[rnd]
        raise TimeoutError("benign: no seal folded it")


def main(argv: list[str] | None = None) -> int:
    hostile = Hostile(loopback_peer_args(__doc__, argv))
    hostile.transport.install_signal_handlers()
    try:
        hostile.gossip.serve()
        hostile.save()  # ready
        hostile.attack()
        while True:
            hostile.pump(lambda: False, timeout_s=3600)
    except KeyboardInterrupt:
        return 0
    finally:
        hostile.gossip.close()
        hostile.replica.close()
        hostile.transport.shutdown()


if __name__ == "__main__":
    sys.exit(main())
