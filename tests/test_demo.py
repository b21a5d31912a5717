"""`nord demo`: the whole swarm on one machine finishes with a checkpoint `nord generate` loads, Ctrl-C
stops it cleanly, and no process (worker, coordinator, DHT child, p2pd, p2pd watchdog) outlives it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from procs import Procs, alive, comm, descendants, free_port, still_running, wait_for

from nord.cli import main
from nord.demo import DemoConfig, shut_down
from nord.demo.processes import spawn, stop_children, stop_signals_raise
from nord.errors import ConfigError


def printed_pid(log: Path, timeout_s: float = 60.0) -> int:
    """The pid a script prints as a line `pid N` (read from its log)."""
    found = wait_for(lambda: re.search(r"^pid (\d+)$", log.read_text(), re.M), timeout_s, f"a pid in {log}")
    return int(found.group(1))


def assert_all_exit(started: dict[int, int], timeout_s: float = 60.0) -> None:
    """Every process of `started` (pid -> start time) exits within `timeout_s` (tracked by PID)."""
    deadline = time.monotonic() + timeout_s
    while (left := still_running(started)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left}


def untouched(proc: subprocess.Popen) -> bool:
    """`proc` is running and no SIGKILL is pending for it (one sent just now may not have landed yet)."""
    if proc.poll() is not None:
        return False
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return False
    pending = [int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith(("SigPnd:", "ShdPnd:"))]
    return not any(mask >> (signal.SIGKILL - 1) & 1 for mask in pending)


PEER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from nord.transport import Transport, TransportConfig
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stuck child: only SIGKILL ends it
    Transport.start(TransportConfig(identity_path=sys.argv[1], local_only=True))
    print("peer" + "-up", flush=True)  # spelled apart: the log also echoes this script
    time.sleep(600)
    """
)


@pytest.mark.p2p
def test_a_child_that_ignores_sigterm_is_killed_with_its_p2pd_and_watchdog(tmp_path):
    # (the clean-SIGTERM path is covered by the whole-demo tests below)
    key = tmp_path / "peer" / "p2p.key"
    key.parent.mkdir()
    argv = [sys.executable, "-c", PEER_SCRIPT, str(key)]
    child = spawn("peer", argv, tmp_path / "peer.log", dict(os.environ))
    try:
        wait_for(lambda: child.proc.poll() is not None or "peer-up" in child.log_path.read_text(), 120, "up")
        assert child.proc.poll() is None, child.last_words()
        started = descendants(child.proc.pid)
        assert any(comm(pid) == "p2pd" for pid in started), "the peer did not start a p2pd"

        killed = stop_children([child], timeout_s=3.0)

        assert child.proc.returncode == -signal.SIGKILL
        assert killed == ["peer"]
        assert_all_exit(started)  # p2pd with its group; the watchdog notices its node's death and exits
    finally:
        stop_children([child], timeout_s=1.0)


def test_stopping_kills_group_members_that_outlive_their_leader(tmp_path):
    argv = ["bash", "-c", "sleep 300 & echo pid $!; exit 0"]
    child = spawn("shell", argv, tmp_path / "shell.log", dict(os.environ))
    child.proc.wait(timeout=60)
    orphan = printed_pid(child.log_path)
    assert alive(orphan), "the orphan did not start"

    stop_children([child], timeout_s=2.0)

    wait_for(lambda: not alive(orphan), 30, "the orphan to be killed with its group")


ORPHANING_PARENT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from nord.demo.processes import spawn
    argv = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = spawn("sleeper", argv, Path(sys.argv[1]), dict(os.environ))
    print("pid", child.proc.pid, flush=True)
    time.sleep(600)
    """
)


def test_children_die_when_the_process_that_spawned_them_is_sigkilled(tmp_path):
    with Procs(tmp_path) as procs:
        parent = procs.start("parent", sys.executable, "-c", ORPHANING_PARENT, str(tmp_path / "sleeper.log"))
        child = printed_pid(tmp_path / "parent.log")
        assert parent.poll() is None, procs.log("parent")
        assert alive(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(child), 30, "the orphaned child to be killed by the kernel")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"workers": 0}, "--workers"),
        ({"rounds": 0}, "--rounds"),
        ({"http": "localhost"}, "HOST:PORT"),
        ({"http": "127.0.0.1:99999"}, "HOST:PORT"),
        ({"inner_steps": 0}, "--inner-steps"),
    ],
)
def test_bad_demo_flags_fail_before_anything_starts(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig(**kwargs)


def test_fresh_refuses_to_delete_a_directory_the_demo_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--state-dir", str(tmp_path), "--fresh"]) == 2
    assert "refuses to delete" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_sigterm_is_handled_like_ctrl_c():
    with pytest.raises(KeyboardInterrupt), stop_signals_raise():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_stopping_the_demo_spares_processes_it_did_not_start_even_if_they_name_its_files(tmp_path):
    cfg = DemoConfig(state_dir=tmp_path)
    log = tmp_path / "worker-0.log"
    worker = spawn("worker-0", [sys.executable, "-c", "import time; time.sleep(600)"], log, dict(os.environ))
    with Procs(tmp_path) as users:
        tail = users.start("tail", "tail", "-f", str(log))  # a user's tail of the demo's log
        by_hand = users.start(  # a worker the user started by hand with its data dir inside the state dir
            "by-hand", sys.executable, "-c", "import time; time.sleep(600)", "--data-dir", f"{tmp_path}/mine"
        )
        wait_for(lambda: b"--data-dir" in Path(f"/proc/{by_hand.pid}/cmdline").read_bytes(), 30, "exec")

        assert shut_down(cfg, dict(os.environ), None, [worker], None) is None

        assert worker.proc.returncode is not None
        assert untouched(tail) and untouched(by_hand)


# ------------------------------------------------------------------------------------- the whole demo


@pytest.fixture(scope="module")
def prepared_corpus(tmp_path_factory):
    """The tiny demo's corpus, prepared once and copied into each demo's state dir (it is a cache)."""
    from nord.data import DataConfig, prepare
    from nord.recipes import get_config

    root = tmp_path_factory.mktemp("corpus")
    prepare(DataConfig(vocab_size=get_config("tiny").vocab_size), root, progress=False)
    return root


class Demo:
    """`nord demo` (tiny, 2 workers) as a subprocess of the test, and every process below it, sampled
    while it runs (PID -> start time), to check that none outlives it."""

    def __init__(self, procs: Procs, state_dir: Path, corpus: Path, *flags: str) -> None:
        shutil.copytree(corpus, state_dir / "data")
        (state_dir / ".nord-demo").touch()
        self.state_dir, self.procs = state_dir, procs
        argv = ["-m", "nord.cli", "demo", "--model", "tiny", "--workers", "2", "--inner-steps", "5"]
        argv += ["--state-dir", str(state_dir), "--http", f"127.0.0.1:{free_port()}", *flags]
        self.proc = procs.start("demo", sys.executable, *argv)
        self.seen: dict[int, int] = {}

    def output(self) -> str:
        return self.procs.log("demo", tail=20_000)

    def wait_for(self, cond, timeout_s: float, what: str):
        """Until `cond()` holds, recording the demo's descendants; fail at once if the demo exits."""

        def check():
            assert self.proc.poll() is None, f"the demo exited early:\n{self.output()}"
            self.seen |= descendants(self.proc.pid)
            return cond()

        return wait_for(check, timeout_s, what)

    def daemons(self) -> int:
        return sum(comm(pid) == "p2pd" for pid in still_running(self.seen))

    def exit_code(self, timeout_s: float = 300.0) -> int:
        """Wait for the demo to exit (recording its descendants meanwhile); its exit code."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"the demo did not exit:\n{self.output()}"
            self.seen |= descendants(self.proc.pid)
            time.sleep(0.2)
        return self.proc.returncode

    def assert_nothing_left(self) -> None:
        assert len(self.seen) >= 5, self.seen  # coordinator, 2 workers and their p2pd at least
        assert_all_exit(self.seen)


def worker_training(state_dir: Path) -> bool:
    return any(
        json.loads(p.read_text()).get("phase") == "training" for p in state_dir.glob("worker-*/status.json")
    )


@pytest.mark.slow
@pytest.mark.p2p
def test_demo_runs_a_round_and_leaves_a_checkpoint_nord_generate_loads(tmp_path, prepared_corpus):
    state = tmp_path / "demo"
    state.mkdir()
    with Procs(tmp_path) as procs:
        demo = Demo(procs, state, prepared_corpus, "--rounds", "1")
        assert demo.exit_code() == 0, demo.output()
        text = demo.output()
        demo.assert_nothing_left()
    assert "round   0 sealed (1 of 1) | val loss" in text  # how far toward --rounds

    # the pull, checked against the seal (a second round may have sealed before it), requires the authority
    # the banner printed: nothing is trusted on first use
    assert re.search(r"weights sealed in round (\d+) \(the base of round \d+\)", text)
    assert "on first use" not in text and "--authority " in text
    (command,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("nord generate ")]
    argv = shlex.split(command)
    assert "--tokenizer" not in argv  # the pull saved the run's tokenizer beside the checkpoint
    assert Path(argv[2]).is_file()
    generated = subprocess.run(
        [sys.executable, "-m", "nord.cli", *argv[1:], "--tokens", "8", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("ROMEO:")


@pytest.mark.slow
@pytest.mark.p2p
def test_ctrl_c_mid_round_exits_cleanly_with_nothing_left_but_a_users_tail_of_its_log(
    tmp_path, prepared_corpus
):
    state = tmp_path / "demo"
    state.mkdir()
    with Procs(tmp_path) as procs:
        demo = Demo(procs, state, prepared_corpus)
        demo.wait_for(lambda: worker_training(state), 300, "a worker training")
        tail = procs.start("tail", "tail", "-f", str(state / "worker-0.log"))
        demo.proc.send_signal(signal.SIGINT)
        assert demo.exit_code() == 130, demo.output()
        assert "interrupted" in demo.output()
        demo.assert_nothing_left()
        assert untouched(tail), "the demo killed a process it did not start"


@pytest.mark.slow
@pytest.mark.p2p
def test_sigkill_of_the_demo_takes_everything_it_started_with_it(tmp_path, prepared_corpus):
    state = tmp_path / "demo"
    state.mkdir()
    with Procs(tmp_path) as procs:
        demo = Demo(procs, state, prepared_corpus)
        demo.wait_for(lambda: demo.daemons() >= 3, 300, "the p2pd of the coordinator and both workers")
        tail = procs.start("tail", "tail", "-f", str(state / "coordinator.log"))
        demo.proc.kill()
        demo.proc.wait()
        demo.assert_nothing_left()
        assert untouched(tail)
