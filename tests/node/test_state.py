"""The worker's state directory: atomic files, a guard against another run's state, resumable contents."""

from __future__ import annotations

import json

import pytest
import torch

from node.state import StateDir
from nord.config import RunConfig, TrainConfig
from nord.data import DataConfig
from nord.errors import ConfigError
from nord.recipes import get_config


def test_worker_state_round_trips(tmp_path):
    state = StateDir(tmp_path / "s")
    assert state.load_worker() is None
    saved = {
        "residual": {"w": torch.randn(3, 4)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "inner_steps_done": 40,
        "envelope": b"\x01\x02",
    }
    state.save_worker(saved)
    loaded = state.load_worker()
    assert torch.equal(loaded["residual"]["w"], saved["residual"]["w"])
    assert (loaded["inner_steps_done"], loaded["envelope"]) == (40, b"\x01\x02")
    assert [p.name for p in state.path.iterdir()] == ["worker.pt"]  # no temporary file left behind


def test_damaged_worker_state_is_named(tmp_path):
    state = StateDir(tmp_path)
    state.worker_file.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="worker.pt is damaged"):
        state.load_worker()


def run_config(**train) -> RunConfig:
    return RunConfig(
        run_id="a",
        model=get_config("tiny"),
        data=DataConfig(vocab_size=get_config("tiny").vocab_size),
        train=TrainConfig(**train),
    )


def test_state_of_another_run_config_is_refused(tmp_path):
    state = StateDir(tmp_path)
    state.check_run(run_config(lr=1e-3).to_json())
    same = json.dumps(json.loads(run_config(lr=1e-3).to_json()), indent=None)  # other formatting
    state.check_run(same)
    with pytest.raises(ConfigError, match="another run config"):
        state.check_run(run_config(lr=2e-3).to_json())


def test_state_written_before_a_new_config_field_still_resumes(tmp_path):
    """run.json saved by a release whose TrainConfig lacked a field (now with a default) is the same run."""
    state = StateDir(tmp_path)
    current = run_config().to_json()
    older = json.loads(current)
    del older["train"]["warmup_steps"]  # a field with a default, absent from the older release's file
    state.run_json.write_text(json.dumps(older))
    state.check_run(current)
    assert state.run_json.read_text() == current  # rewritten in the current form
    with pytest.raises(ConfigError, match="another run config"):
        state.check_run(run_config(warmup_steps=TrainConfig().warmup_steps + 1).to_json())


def test_an_unreadable_stored_run_config_is_named(tmp_path):
    state = StateDir(tmp_path)
    state.run_json.write_text('{"run_id": "a", "train": {"lr": 1}}')
    with pytest.raises(ConfigError, match="not a run config this version reads"):
        state.check_run(run_config().to_json())


def test_status_is_written_atomically_as_json(tmp_path):
    state = StateDir(tmp_path)
    state.write_status({"round": 3, "phase": "training"})
    assert state.read_status() == {"round": 3, "phase": "training"}


def test_status_keeps_the_last_trained_rounds_loss_while_the_next_round_runs(tmp_path):
    state = StateDir(tmp_path)
    state.write_status({"round": 4, "phase": "sealed", "loss": 3.5, "firing_rate": 0.12})
    state.write_status({"round": 5, "phase": "training"})
    assert state.read_status() == {
        "round": 5,
        "phase": "training",
        "loss": 3.5,
        "firing_rate": 0.12,
        "loss_round": 4,
    }
    state.write_status({"round": 5, "phase": "sealed", "loss": None, "firing_rate": None})  # not trained
    assert state.read_status()["loss"] == 3.5 and state.read_status()["loss_round"] == 4
    state.write_status({"round": 6, "phase": "sealed", "loss": 3.1, "firing_rate": 0.1})
    assert (state.read_status()["loss"], state.read_status()["loss_round"]) == (3.1, 6)
