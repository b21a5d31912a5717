"""Child processes of `nord demo`: each in its own session, stopped group by group, nothing left behind.

A child started with `start_new_session` leads its own process group; the hivemind DHT process and its
Go `p2pd` daemon it starts join that group. Stopping sends SIGTERM to the group, waits, then SIGKILLs
what is left — including members that outlived the leader. Any process still naming the demo's state
dir afterwards (p2pd runs with `-id=<state>/p2p.key`) is killed as a last resort.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 20.0  # SIGTERM grace period per process group before SIGKILL (a worker needs 2-5 s)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def last_words(self) -> str:
        """The last non-empty line of the child's log (its error, when it failed) and where the log is."""
        try:
            lines = [
                ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()
            ]
        except OSError:
            lines = []
        return f"{lines[-1] if lines else 'no output'} (log: {self.log_path})"


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Child:
    """Start `argv` in a new session (its own process group) with stdout+stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
    return Child(name=name, proc=proc, log_path=log_path)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal still exists
        return True
    return True


def stop_children(children: list[Child], timeout_s: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM every child's process group, SIGKILL whatever is left after `timeout_s`.

    Returns the names of groups that had to be killed. The leader's pid is its group id
    (`start_new_session`), and the group outlives the leader while any member (DHT process, p2pd) lives.
    """
    for child in children:
        if group_alive(child.proc.pid):
            try:
                os.killpg(child.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for child in children:
            child.proc.poll()
        if not any(group_alive(c.proc.pid) for c in children):
            break
        time.sleep(0.1)
    killed = []
    for child in children:
        if group_alive(child.proc.pid):
            log.warning("%s did not stop within %.0f s of SIGTERM; killing it", child.name, timeout_s)
            killed.append(child.name)
            try:
                os.killpg(child.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for child in children:
        try:
            child.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit after SIGKILL", child.name, child.proc.pid)
    # Members of a killed group are reparented to init, which reaps them; wait until they are gone.
    deadline = time.monotonic() + 5
    while any(group_alive(c.proc.pid) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (like Ctrl-C) for the duration, so both clean up the same way."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_ignored_while_stopping() -> Iterator[None]:
    """A second Ctrl-C while the children are being stopped must not abandon them half-stopped."""
    previous = {
        s: signal.signal(s, lambda signum, frame: print("stopping, please wait…", file=sys.stderr))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ancestors() -> set[int]:
    """This process and every process above it (never ours to kill, even if they name the state dir)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return pids


def leftover_processes(state_dir: Path) -> list[str]:
    """SIGKILL any process that still names a path *inside* the state dir (the children's own state dirs,
    or a p2pd started with `-id=<state>/<child>/p2p.key`); the demo's own command line names only the
    state dir itself, and its ancestors are skipped anyway.

    Linux only (reads /proc); elsewhere the process groups are all there is.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    inside = str(state_dir).rstrip("/") + "/"
    spared = ancestors()
    killed = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if any(a.removeprefix("-id=").startswith(inside) for a in argv):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(f"{entry.name} {argv[0]}")
    return killed
