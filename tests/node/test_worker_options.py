"""`Worker(options)` only checks and keeps its options: the state dir, the peer, the DHT and the replica
are opened by `start()`, so a worker can be built, inspected and refused without touching anything."""

from __future__ import annotations

import os
import threading

import pytest

from node.__main__ import build_parser
from node.worker import Worker
from node.worker_options import WorkerOptions
from nord.errors import ConfigError

# Port 9 (discard) on loopback: nothing answers there.
UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/QmZqWdarUY7R8ntSuKJvTJGDmtzasj8YkP4Q39sZoZmXv8"


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_constructing_a_worker_opens_no_dir_socket_or_thread(tmp_path):
    state_dir = tmp_path / "not-yet" / "state"
    args = build_parser().parse_args(
        ["join", "--run", "r1", "--initial-peers", UNREACHABLE, "--state-dir", str(state_dir)]
    )
    threads, fds = threading.active_count(), open_fds()

    worker = Worker(WorkerOptions.from_args(args))

    assert not (tmp_path / "not-yet").exists()
    assert threading.active_count() == threads
    assert open_fds() <= fds
    assert worker.transport is None and worker.replica is None
    worker.close()  # nothing started: nothing to stop
    assert not (tmp_path / "not-yet").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"initial_peers": ()}, "no --initial-peers"),
        ({"initial_peers": ("/ip4/127.0.0.1/tcp/9",)}, "no /p2p/"),
        ({"shard": "9/4"}, "need 0 <= i < n"),
        ({"authority": "not-hex"}, "--authority"),
        ({"poll_s": 0.0}, "--poll-s"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(tmp_path, change, message):
    options = {"run_id": "r1", "initial_peers": (UNREACHABLE,), "state_dir": tmp_path / "state", **change}
    with pytest.raises(ConfigError, match=message):
        WorkerOptions(**options)
    assert not (tmp_path / "state").exists()
