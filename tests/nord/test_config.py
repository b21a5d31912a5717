"""RunConfig: JSON round trip, and every kind of bad input is a one-line ConfigError."""

import dataclasses
import json

import pytest

from nord.config import RunConfig, TrainConfig
from nord.errors import ConfigError


def minimal() -> dict:
    return {"run_id": "test-run", "model": {}, "data": {}}


def test_round_trip_through_json_is_identity():
    cfg = RunConfig.from_dict(minimal())
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(cfg.to_json())


def test_sections_are_built_from_their_own_dataclasses():
    cfg = RunConfig.from_dict({**minimal(), "train": {"inner_steps": 7}})
    assert isinstance(cfg.train, TrainConfig) and cfg.train.inner_steps == 7


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"run_id": "Bad Id", "model": {}, "data": {}}, "run id"),
        ({"run_id": "ok"}, "needs at least"),
        ({**minimal(), "surprise": 1}, "unknown keys: surprise"),
        ({**minimal(), "train": {"inner_steps": 0}}, "inner_steps"),
        ({**minimal(), "train": {"nope": 1}}, "section 'train' has unknown keys"),
        ({**minimal(), "train": 3}, "must be an object"),
        ({**minimal(), "authorities": ["zz"]}, "authority key"),
    ],
    ids=["run-id", "missing-sections", "unknown-key", "bad-value", "unknown-field", "not-object", "bad-key"],
)
def test_bad_run_config_is_rejected_with_a_clear_message(raw, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(raw)


def test_invalid_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        RunConfig.from_json("{")
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.load(tmp_path / "nope.json")


# ---- the trust anchor: a run config is signed by its authority and pinned by fingerprint (#17) ----


def signed_pair():
    from nord.identity import Identity

    authority, impostor = Identity.from_private_bytes(b"\x05" * 32), Identity.from_private_bytes(b"\x06" * 32)
    run = RunConfig.from_dict({**minimal(), "authorities": [authority.public_hex], "genesis_hash": "a" * 64})
    return run.signed(authority), authority, impostor


def test_a_signed_config_verifies_against_its_pinned_authority_only():
    run, authority, impostor = signed_pair()
    again = RunConfig.from_json(run.to_json())  # as served and fetched
    assert again.verify(authority.fingerprint) == authority.public_hex
    assert again.verify(None) == authority.public_hex  # trust on first use: still must be self-consistent
    with pytest.raises(ConfigError, match=f"signed by authority {authority.fingerprint}, not the pinned"):
        again.verify(impostor.fingerprint)
    claimed = again.with_authorities((impostor.public_hex,)).signed(impostor)
    with pytest.raises(ConfigError, match="not the pinned"):
        claimed.verify(authority.fingerprint)


def test_any_change_to_a_signed_config_breaks_its_signature():

    run, authority, _ = signed_pair()
    for changed in (
        dataclasses.replace(run, genesis_hash="b" * 64),
        dataclasses.replace(run, train=TrainConfig(inner_steps=99)),
        RunConfig.from_json(run.to_json().replace('"quorum": 3', '"quorum": 1')),
    ):
        with pytest.raises(ConfigError, match="signature by none of its authorities"):
            changed.verify(authority.fingerprint)
    with pytest.raises(ConfigError, match="not signed"):
        run.with_authorities(run.authorities).verify(None)


def test_signing_needs_an_authority_key_and_a_genesis_hash():

    run, authority, impostor = signed_pair()
    with pytest.raises(ConfigError, match="is not an authority"):
        run.signed(impostor)
    with pytest.raises(ConfigError, match="no genesis_hash"):
        dataclasses.replace(run, genesis_hash="").signed(authority)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("genesis_hash", "xyz", "genesis_hash"),
        ("signature", "00", "signature"),
        ("signature", 5, "must be strings"),
        ("run_id", "bad\n", "invalid"),  # the old pattern's `$` let a trailing newline through
    ],
)
def test_trust_fields_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({**minimal(), field: value})


def test_fingerprints_are_checked():
    from nord.checks import matches_fingerprint
    from nord.config import check_fingerprint

    key = "0123456789abcdef" * 4
    assert check_fingerprint(" 0123456789ABCDEF0123 ", "--authority") == "0123456789abcdef0123"
    assert matches_fingerprint(key, "0123456789abcdef") and not matches_fingerprint(key, "1123456789abcdef")
    for bad in ("0123", "xyz0123456789abcdef", "0" * 65):
        with pytest.raises(ConfigError, match="16-64 hex digits"):
            check_fingerprint(bad, "--authority")


def test_a_signature_holds_for_the_document_as_signed_whatever_this_version_adds():
    """A config written by an older version lacks fields this one fills with defaults: its signature is
    over the document its authority signed, so it still verifies (and still breaks if that changes)."""
    run, authority, _ = signed_pair()
    from nord.config import SIGNING_DOMAIN

    raw = {k: v for k, v in json.loads(run.to_json()).items() if k != "signature"}
    del raw["train"]["seed"]  # as if `seed` were new in this version (its default is the same value)
    signed_then = SIGNING_DOMAIN + json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()
    document = {**raw, "signature": authority.sign(signed_then).hex()}
    assert RunConfig.from_dict(document).verify(authority.fingerprint) == authority.public_hex
    document["train"]["seed"] = 1
    with pytest.raises(ConfigError, match="signature by none"):
        RunConfig.from_dict(document).verify(authority.fingerprint)
