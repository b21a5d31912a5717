"""Process helpers shared by the tests that start real peers: each process in its own group, tracked by
PID, stopped on the way out of a test whether it passed, failed or timed out; waits on events, not sleeps.

Nothing here finds processes by name or command line: a test stops only what it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STOP_TIMEOUT_S = 30.0  # SIGTERM grace per process before its group is SIGKILLed (generous: loaded machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def p2pd_children(pid: int) -> set[int]:
    """The p2pd daemons whose parent is `pid` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "p2pd":
                continue
            ppid = int(_stat(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.add(int(entry.name))
    return found


def descendants(pid: int) -> dict[int, int]:
    """Every live process below `pid` (children, grandchildren, ...) -> its start time, from /proc.

    The start time tells a process from a later one that reuses its pid (see `still_running`).
    """
    parent_of = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent_of[int(entry.name)] = int(_stat(int(entry.name))[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, ppid in parent_of.items() if ppid in frontier and p not in found}
        found |= frontier
    return {p: t for p in found if (t := started_at(p)) is not None}


def started_at(pid: int) -> int | None:
    """Start time of live process `pid` (clock ticks after boot); None if it is gone or a zombie."""
    try:
        fields = _stat(pid)
        return int(fields[19]) if fields[0] != "Z" else None
    except (OSError, IndexError, ValueError):
        return None


def still_running(seen: dict[int, int]) -> set[int]:
    """The processes of `seen` (pid -> start time, from `descendants`) that have not exited."""
    return {pid for pid, t in seen.items() if started_at(pid) == t}


def comm(pid: int) -> str:
    """The executable name of `pid` ("" if it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(cond, timeout_s: float, what: str):
    """Poll `cond()` until it returns something truthy (a file not written yet counts as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = cond()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal `proc`'s process group if it leads one (started with start_new_session), else `proc`."""
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:  # no such group: it does not lead one, or everything in it is gone
        if proc.poll() is None:
            proc.send_signal(signum)
    except PermissionError:
        pass


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the group of every live process, then wait for each; SIGKILL the group of one that
    outlives `timeout_s`."""
    for proc in procs:
        if proc.poll() is None:
            signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait()


class Procs:
    """The processes one test starts, each leading its own process group (its p2pd joins it), with its
    output in `log_dir/<name>.log`.

    Use as a context manager: on the way out (pass, failure or pytest-timeout) every group still running
    is stopped, and whatever is left of it — a p2pd whose node was SIGKILLed — is SIGKILLed, so nothing a
    test started outlives it. Check the product's own cleanup (`assert_daemons_gone`) before that.
    """

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.daemons: set[int] = set()

    def start(self, name: str, *args: str, module: str | None = None) -> subprocess.Popen:
        """Start `python -m <module> args` (or `args` as the whole command line when no module)."""
        argv = [sys.executable, "-m", module, *args] if module else list(args)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, name: str, tail: int = 3000) -> str:
        try:
            return (self.log_dir / f"{name}.log").read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def record_daemon(self, proc: subprocess.Popen, timeout_s: float = 120) -> None:
        """Remember the p2pd `proc` starts, to check later that none outlives the test."""
        self.daemons |= wait_for(lambda: p2pd_children(proc.pid), timeout_s, f"the p2pd of pid {proc.pid}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        stop_processes(self.procs, timeout_s)

    def assert_daemons_gone(self, timeout_s: float = 30) -> None:
        """Every recorded p2pd exits by itself (its node's shutdown or its watchdog) within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (left := {pid for pid in self.daemons if alive(pid)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"p2pd processes outlived their nodes: {sorted(left)}"

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for proc in self.procs:  # group members that outlived their leader
            signal_group(proc, signal.SIGKILL)
        for pid in self.daemons:
            if alive(pid) and comm(pid) == "p2pd":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
