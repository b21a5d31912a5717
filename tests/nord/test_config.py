"""RunConfig: JSON round trip, and every kind of bad input is a one-line ConfigError."""

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
