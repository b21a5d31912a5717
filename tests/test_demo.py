"""`nord demo`: the whole swarm on one machine finishes with a checkpoint `nord generate` loads, Ctrl-C
stops it cleanly, and no process (worker, coordinator, DHT child, p2pd, p2pd watchdog) outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nord.demo import DemoConfig
from nord.demo.processes import leftover_processes, spawn, stop_children
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
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stuck child: only SIGKILL ends it
    Transport.start(TransportConfig(identity_path=sys.argv[1], local_only=True))
    print("peer" + "-up", flush=True)  # spelled apart: the log also echoes this script
    time.sleep(600)
    """
)


@pytest.mark.p2p
@pytest.mark.parametrize("behaviour", ["ignore-term", "default"])
def test_stopping_children_leaves_no_dht_or_p2pd_behind(tmp_path, behaviour):
    key = tmp_path / "peer" / "p2p.key"
    key.parent.mkdir()
    child = spawn(
        "peer",
        [sys.executable, "-c", PEER_SCRIPT, str(key), behaviour],
        tmp_path / "peer.log",
        dict(os.environ),
    )
    deadline = time.monotonic() + 60
    while "peer-up" not in child.log_path.read_text() and time.monotonic() < deadline:
        assert child.proc.poll() is None, child.log_tail()
        time.sleep(0.2)
    started = hivemind_processes(tmp_path)
    assert any("p2pd" in argv[0] for argv in started.values()), "the peer did not start a p2pd"

    stuck = behaviour == "ignore-term"
    killed = stop_children([child], timeout_s=3.0 if stuck else 20.0)

    assert child.proc.returncode is not None
    assert killed == (["peer"] if stuck else [])
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


def test_fresh_refuses_to_delete_a_directory_the_demo_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    out = subprocess.run(
        [sys.executable, "-m", "nord.cli", "demo", "--state-dir", str(tmp_path), "--fresh"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "refuses to delete" in out.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_leftover_sweep_kills_only_processes_naming_paths_inside_the_state_dir(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    naming_root = subprocess.Popen([*sleeper, str(tmp_path)])  # like the `nord demo --state-dir X` itself
    naming_child = subprocess.Popen([*sleeper, f"-id={tmp_path}/worker-0/p2p.key"])  # like a stray p2pd
    try:
        killed = leftover_processes(tmp_path)
        assert [k.split()[0] for k in killed] == [str(naming_child.pid)]
        assert naming_child.wait(timeout=10) == -signal.SIGKILL
        assert naming_root.poll() is None
    finally:
        naming_root.kill()
        naming_child.kill()
        naming_root.wait()
