"""`nord demo`: the whole swarm on one machine finishes with a checkpoint `nord generate` loads, Ctrl-C
stops it cleanly, and no process (worker, coordinator, DHT child, p2pd, p2pd watchdog) outlives it."""

from __future__ import annotations

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

from nord.cli import main
from nord.demo import DemoConfig, free_port
from nord.demo.processes import leftover_processes, spawn, stop_children, stop_signals_raise
from nord.errors import ConfigError


def processes_naming(text: str) -> dict[int, list[str]]:
    """pid -> argv of every live process with `text` inside one of its arguments (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(text in a for a in argv):
            found[int(entry.name)] = argv
    return found


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until_gone(text: str, timeout_s: float = 10.0) -> dict[int, list[str]]:
    deadline = time.monotonic() + timeout_s
    while (left := processes_naming(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def hivemind_processes(state_dir: Path) -> dict[int, list[str]]:
    """p2pd daemons started with an identity under `state_dir`, and their watchdogs (which name their pid)."""
    daemons = processes_naming(f"-id={state_dir}")
    watchdogs = {pid: argv for d in daemons for pid, argv in processes_naming(str(d)).items() if "-c" in argv}
    return {**daemons, **watchdogs}


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
def test_a_child_that_ignores_sigterm_is_killed_with_its_dht_and_p2pd(tmp_path):
    # (the clean-SIGTERM path is covered by the whole-demo tests below)
    key = tmp_path / "peer" / "p2p.key"
    key.parent.mkdir()
    child = spawn(
        "peer",
        [sys.executable, "-c", PEER_SCRIPT, str(key)],
        tmp_path / "peer.log",
        dict(os.environ),
    )
    deadline = time.monotonic() + 60
    while "peer-up" not in child.log_path.read_text() and time.monotonic() < deadline:
        assert child.proc.poll() is None, child.last_words()
        time.sleep(0.2)
    started = hivemind_processes(tmp_path)
    assert any("p2pd" in argv[0] for argv in started.values()), "the peer did not start a p2pd"

    killed = stop_children([child], timeout_s=3.0)

    assert child.proc.returncode == -signal.SIGKILL
    assert killed == ["peer"]
    assert not wait_until_gone(str(tmp_path)), "a process naming the state dir survived"
    deadline = time.monotonic() + 10  # the watchdog notices its parent's death and exits by itself
    while (alive := [pid for pid in started if is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, {pid: started[pid] for pid in alive}


def test_stopping_kills_group_members_that_outlive_their_leader(tmp_path):
    marker = f"nord-demo-orphan-{os.getpid()}"
    script = f"exec -a {marker} sleep 300 & echo started; exit 0"
    child = spawn("shell", ["bash", "-c", script], tmp_path / "shell.log", dict(os.environ))
    child.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not processes_naming(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(marker), "the orphan did not start"

    stop_children([child], timeout_s=2.0)

    assert not wait_until_gone(marker, timeout_s=5.0)


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


def wait_until_exec(*children: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Until a child has exec'd, /proc shows the parent's (pytest's) command line instead of its own."""
    deadline = time.monotonic() + timeout_s
    for child in children:
        while b"time.sleep" not in Path(f"/proc/{child.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "child did not start"
            time.sleep(0.01)


def test_leftover_sweep_kills_only_processes_naming_paths_inside_the_state_dir(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    naming_root = subprocess.Popen([*sleeper, str(tmp_path)])  # like the `nord demo --state-dir X` itself
    naming_child = subprocess.Popen([*sleeper, f"-id={tmp_path}/worker-0/p2p.key"])  # like a stray p2pd
    try:
        wait_until_exec(naming_root, naming_child)
        killed = leftover_processes(tmp_path)
        assert [k.split()[0] for k in killed] == [str(naming_child.pid)]
        assert naming_child.wait(timeout=10) == -signal.SIGKILL
        assert naming_root.poll() is None
    finally:
        naming_root.kill()
        naming_child.kill()
        naming_root.wait()


# ------------------------------------------------------------------------------------- the whole demo


@pytest.fixture(scope="module")
def prepared_corpus(tmp_path_factory):
    """The tiny demo's corpus, prepared once and copied into each demo's state dir (it is a cache)."""
    from nord.data import DataConfig, prepare
    from nord.recipes import get_config

    root = tmp_path_factory.mktemp("corpus")
    prepare(DataConfig(vocab_size=get_config("tiny").vocab_size), root, progress=False)
    return root


def start_demo(state_dir: Path, corpus: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    shutil.copytree(corpus, state_dir / "data")
    (state_dir / ".nord-demo").touch()
    out = state_dir.parent / f"{state_dir.name}.out"
    argv = [
        sys.executable,
        "-m",
        "nord.cli",
        "demo",
        "--model",
        "tiny",
        "--workers",
        "2",
        "--inner-steps",
        "5",
    ]
    argv += ["--state-dir", str(state_dir), "--http", f"127.0.0.1:{free_port('127.0.0.1')}", *flags]
    with open(out, "w") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, text=True), out


def assert_nothing_left(state_dir: Path) -> None:
    left = wait_until_gone(str(state_dir) + "/", timeout_s=10.0)
    assert not left, f"processes outlived the demo: {left}"


@pytest.mark.slow
@pytest.mark.p2p
def test_demo_runs_a_round_and_leaves_a_checkpoint_nord_generate_loads(tmp_path, prepared_corpus):
    state = tmp_path / "demo"
    state.mkdir()
    demo, out = start_demo(state, prepared_corpus, "--rounds", "1")
    try:
        assert demo.wait(timeout=240) == 0, out.read_text()
    finally:
        demo.kill()
    text = out.read_text()
    assert "round   0 sealed | val loss" in text
    assert_nothing_left(state)

    # the pull, checked against the seal (a second round may have sealed before it)
    assert re.search(r"weights sealed in round (\d+) \(the base of round \d+\)", text)
    (command,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("nord generate ")]
    argv = shlex.split(command)
    assert "--tokenizer" not in argv  # the pull saved the run's tokenizer beside the checkpoint
    assert Path(argv[2]).is_file()
    generated = subprocess.run(
        [sys.executable, "-m", "nord.cli", *argv[1:], "--tokens", "8", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("ROMEO:")


@pytest.mark.slow
@pytest.mark.p2p
def test_ctrl_c_mid_round_exits_cleanly_with_nothing_left(tmp_path, prepared_corpus):
    signum, when = signal.SIGINT, "worker(s) training"
    state = tmp_path / "demo"
    state.mkdir()
    demo, out = start_demo(state, prepared_corpus)
    try:
        deadline = time.monotonic() + 120
        while when not in out.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, out.read_text()
            time.sleep(0.2)
        assert when in out.read_text()
        time.sleep(3)  # mid-round: the workers are training
        demo.send_signal(signum)
        code = demo.wait(timeout=90)
    finally:
        demo.kill()
    assert code == 130, out.read_text()
    assert "interrupted" in out.read_text()
    assert_nothing_left(state)
