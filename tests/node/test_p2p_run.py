"""End to end on 127.0.0.1, each peer its own process: a bootstrap authority and three workers (one in client
mode) train the tiny model for three rounds; one worker is SIGKILLed mid-round and restarted.

Checks: every replica ends on the same sealed weights hash; every round's seal folds exactly one
contribution from each of the three workers (nothing lost, nothing counted twice); no p2pd outlives the
test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import alive, p2pd_children, stop_processes, wait_for

import nord
from nord.checkpoint import weights_hash
from nord.model import load_model

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(300)]

RUN = "e2e"
ROUNDS = 3


def p2pd_using(directory: Path) -> set[int]:
    """Live p2pd processes whose command line names a file under `directory` (their identity)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "p2pd":
                if str(directory).encode() in (entry / "cmdline").read_bytes() and alive(int(entry.name)):
                    found.add(int(entry.name))
        except OSError:
            continue
    return found


def read_status(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


class Peers:
    """The test's processes; every p2pd they start is recorded so the test can check none survives."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.daemons: set[int] = set()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", *args], stdout=log, stderr=subprocess.STDOUT, env=self.env
        )
        log.close()
        self.procs.append(proc)
        return proc

    def record_daemon(self, proc: subprocess.Popen) -> None:
        self.daemons |= wait_for(lambda: p2pd_children(proc.pid), 60, f"the p2pd of pid {proc.pid}")

    def stop_all(self) -> None:
        stop_processes(self.procs, timeout_s=20)


def test_three_workers_converge_and_a_killed_worker_catches_up(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i, src in enumerate(sorted(Path(nord.__file__).parent.rglob("*.py"))):
        shutil.copy(src, text / f"{i:03d}_{src.stem}.txt")
    data = str(tmp_path / "data")
    peers = Peers(tmp_path)
    try:
        boot_dir = tmp_path / "boot"
        boot = peers.start(
            "boot", "bootstrap", "--run", RUN, "--state-dir", str(boot_dir), "--data-dir", data,
            "--data-source", str(text), "--recipe", "tiny", "--inner-steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--quorum", "3", "--deadline-s", "120", "--local-only",
        )  # fmt: skip
        maddr = wait_for(
            lambda: (boot_dir / "maddrs.txt").is_file() and (boot_dir / "maddrs.txt").read_text().split()[0],
            120,
            "the bootstrap peer's address",
        )
        peers.record_daemon(boot)

        def join(name: str, rounds: int, *extra: str) -> subprocess.Popen:
            proc = peers.start(
                name, "join", "--run", RUN, "--initial-peers", maddr, "--state-dir", str(tmp_path / name),
                "--data-dir", data, "--max-rounds", str(rounds), "--poll-s", "0.3", "--no-progress",
                "--compact-every", "2", "--local-only", *extra,
            )  # fmt: skip
            return proc

        workers = {
            "w0": join("w0", ROUNDS),
            "w1": join("w1", ROUNDS),
            "w2": join("w2", ROUNDS, "--client-mode"),
        }
        for proc in workers.values():
            peers.record_daemon(proc)

        # SIGKILL w1 while it is in round 1 (training or waiting for the seal), then restart it.
        wait_for(lambda: read_status(tmp_path / "w1").get("round") == 1, 150, "w1 to reach round 1")
        workers["w1"].kill()
        workers["w1"].wait()
        workers["w1"] = join("w1", ROUNDS - 1)
        peers.record_daemon(workers["w1"])

        for name, proc in workers.items():
            code = proc.wait(timeout=240)
            assert code == 0, f"{name} exited with {code}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"

        boot_status = read_status(boot_dir)
        assert boot_status["open_round"] == ROUNDS
        worker_keys = {name: (tmp_path / name / "identity.key") for name in workers}
        assert all(p.is_file() for p in worker_keys.values())
        for seal in boot_status["seals"]:
            assert len(seal["contributors"]) == 3 == len(set(seal["contributors"])), seal
        for name in workers:
            status = read_status(tmp_path / name)
            assert status["open_round"] == ROUNDS, (name, status)
            assert status["sealed_weights_hash"] == boot_status["sealed_weights_hash"], name

        # anyone can pull the sealed weights over P2P as a model file `nord generate` reads
        out = tmp_path / "pulled" / "model.safetensors"
        pull = peers.start("pull", "pull", "--from", maddr, "--run", RUN, "--out", str(out), "--local-only")
        assert pull.wait(timeout=120) == 0, (tmp_path / "pull.log").read_text()[-2000:]
        model, meta = load_model(out)
        assert meta["weights_hash"] == boot_status["sealed_weights_hash"]
        assert weights_hash(model.state_dict()) == boot_status["sealed_weights_hash"]
        assert (out.parent / "tokenizer.json").is_file() and meta["tokenizer_path"].endswith("tokenizer.json")
    finally:
        peers.stop_all()
    assert boot.returncode == 0, (tmp_path / "boot.log").read_text()[-3000:]
    survivors = {pid for pid in peers.daemons if alive(pid)}
    deadline = time.monotonic() + 15
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = {pid for pid in survivors if alive(pid)}
    assert survivors == set(), "p2pd processes outlived the test"
    assert p2pd_using(tmp_path) == set(), "a p2pd still holds an identity of this test"
