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


def make_replica_dir(path, marker: str) -> None:
    path.mkdir(parents=True)
    (path / "CURRENT").write_text(marker)


def test_a_verified_replica_is_swapped_in_whole(tmp_path):
    state = StateDir(tmp_path)
    make_replica_dir(state.replica_dir, "old")
    make_replica_dir(state.incoming_replica_dir, "new")
    state.swap_replica()
    assert (state.replica_dir / "CURRENT").read_text() == "new"
    assert not state.incoming_replica_dir.exists() and not state.old_replica_dir.exists()


@pytest.mark.parametrize(
    "left, expected",
    [
        ({"replica": "old", "replica.new": "partial"}, "old"),  # crashed while fetching: keep the old one
        ({"replica.old": "old", "replica.new": "new"}, "new"),  # crashed between the two renames
        ({"replica.old": "old"}, "old"),
        ({"replica": "new", "replica.old": "old"}, "new"),  # crashed before dropping the old one
    ],
)
def test_a_crash_during_a_swap_leaves_one_whole_replica(tmp_path, left, expected):
    state = StateDir(tmp_path)
    for name, marker in left.items():
        make_replica_dir(tmp_path / name, marker)
    state.recover_replica()
    assert (state.replica_dir / "CURRENT").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica"]


def test_the_pinned_authority_is_stored_and_checked(tmp_path):
    from node.session import pinned_authority

    state = StateDir(tmp_path)
    assert state.pinned_authority() is None and pinned_authority(None, state) is None
    state.pin_authority("ab" * 10)
    assert pinned_authority(None, state) == "ab" * 10
    assert pinned_authority("AB" * 8, state) == "ab" * 8  # a shorter prefix of the same key
    with pytest.raises(ConfigError, match="differs from the authority"):
        pinned_authority("cd" * 10, state)
    state.authority_file.write_text("not hex\n")
    with pytest.raises(ConfigError, match="16-64 hex digits"):
        state.pinned_authority()


def test_the_same_run_config_resumes_whatever_its_signature_another_does_not(tmp_path):
    import dataclasses

    from nord.identity import Identity

    authority = Identity.from_private_bytes(b"\x07" * 32)
    run = dataclasses.replace(run_config(), authorities=(authority.public_hex,), genesis_hash="a" * 64)
    state = StateDir(tmp_path)
    state.check_run(run.to_json())
    state.check_run(run.signed(authority).to_json())  # re-signed by the bootstrap peer on restart
    assert RunConfig.from_json(state.run_json.read_text()).verify(None) == authority.public_hex
    other = Identity.from_private_bytes(b"\x08" * 32)
    with pytest.raises(ConfigError, match="another run config"):
        state.check_run(run.with_authorities((other.public_hex,)).signed(other).to_json())
