"""The worker's state directory: atomic files, a guard against another run's state, resumable contents."""

from __future__ import annotations

import json

import pytest
import torch

from node.state import StateDir
from nord.errors import ConfigError


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


def test_state_of_another_run_config_is_refused(tmp_path):
    state = StateDir(tmp_path)
    state.check_run(json.dumps({"run_id": "a", "train": {"lr": 1}}))
    state.check_run(json.dumps({"train": {"lr": 1}, "run_id": "a"}))  # same config, other key order
    with pytest.raises(ConfigError, match="another run config"):
        state.check_run(json.dumps({"run_id": "a", "train": {"lr": 2}}))


def test_status_is_written_atomically_as_json(tmp_path):
    state = StateDir(tmp_path)
    state.write_status({"round": 3, "phase": "training"})
    assert state.read_status() == {"round": 3, "phase": "training"}
