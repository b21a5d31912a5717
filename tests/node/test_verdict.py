"""The line a worker prints after each round says what the authority did with its contribution."""

from __future__ import annotations

from node.report import contribution_verdict

MINE, OTHER = "a" * 64, "b" * 64


def test_listed_in_the_seal_is_accepted():
    assert contribution_verdict([MINE], (OTHER, MINE), {}) == "contribution accepted"


def test_a_signed_removal_gives_the_validators_reason():
    reasons = {MINE: "loss rose by 0.81 nats on the held-out batch"}
    assert contribution_verdict([MINE], (OTHER,), reasons) == (
        "contribution rejected: loss rose by 0.81 nats on the held-out batch"
    )


def test_neither_sealed_nor_removed_is_undecided_not_accepted():
    assert contribution_verdict([MINE], (OTHER,), {OTHER: "spam"}).startswith("contribution not in the seal")
    assert contribution_verdict([MINE], None, {}).startswith("contribution pending")
    assert contribution_verdict([], (OTHER,), {}) == "no contribution from this peer"
