"""What a worker tells its volunteer after each round, and what it leaves in status.json for scripts."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RoundReport:
    round: int
    loss: float | None
    firing_rate: float | None
    contributed: bool


ACCEPTED = "contribution accepted"


def contribution_verdict(mine: list[str], sealed: tuple[str, ...] | None, reasons: dict[str, str]) -> str:
    """One line on our contributions `mine` to a round: accepted if its seal (`sealed`: the ids it folded;
    None when the seal is not held) lists one, rejected with the removal's reason, else still undecided."""
    if not mine:
        return "no contribution from this peer"
    if sealed is not None and any(cid in sealed for cid in mine):
        return ACCEPTED
    rejected = [reasons[cid] for cid in mine if cid in reasons]
    if rejected:
        return f"contribution rejected: {rejected[0]}"
    if sealed is None:
        return "contribution pending (the round's seal is not held here)"
    return "contribution not in the seal (no reason received yet: it may have arrived late)"


def replica_verdict(replica, me: bytes, rnd: int) -> str:
    """What the authority did with the contribution of key `me` to sealed round `rnd`, as `replica` holds
    it: its seal lists it (accepted), a signed removal gives the validator's reason (rejected), or neither
    (yet). Call under the gossip lock."""
    seal = replica.sealed(rnd)
    if seal is not None and (me, rnd) in replica.base.dots:  # adopted from its aggregate: ours was folded
        return ACCEPTED
    mine = [cid for cid, e in replica.contributions(round=rnd) if e.peer_key == me]
    reasons = {r.contribution_id: r.reason for r in replica.removals()}
    return contribution_verdict(mine, seal.contribution_ids if seal else None, reasons)


def round_line(report: RoundReport, verdict: str, status: dict) -> str:
    """The line printed after round `report.round` (`status`: what status.json says of it)."""
    loss = f"{report.loss:.3f}" if report.loss is not None else "  -  "
    rate = f"{report.firing_rate:.3f}" if report.firing_rate is not None else "  -  "
    return (
        f"round {report.round} | {verdict} | loss {loss} | firing rate {rate} | peers {status['peers']} | "
        f"up {_mb(status['bytes_up'])} down {_mb(status['bytes_down'])} | "
        f"weights {status['sealed_weights_hash'][:12]}"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
