"""Child processes of `nord demo`: each in its own session, stopped group by group, nothing left behind.

The demo stops only what it started, tracked by PID: a child started with `start_new_session` leads its
own process group, and the Go `p2pd` daemon it starts joins that group. Stopping sends SIGTERM to each
group, waits, then SIGKILLs what is left — including members that outlived their leader. Nothing is
ever found or killed by name or by a path on its command line (a user's `tail -f` of a log is theirs).

If the demo itself dies without stopping them (SIGKILL, a crash), the kernel kills every child it
started (`PR_SET_PDEATHSIG`, Linux), and each child's p2pd follows through its own watchdog
(`nord.transport`); coordinator and workers are crash-safe, so that loses nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 20.0  # SIGTERM grace period per process group before SIGKILL (a worker needs 2-5 s)
PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when the thread that made it dies


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


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the child when this process dies, however it dies
    (Linux; None elsewhere). SIGKILL, not SIGTERM: nobody is left to escalate if a child hangs stopping.

    Call it in the thread that starts the child and outlives it (the main thread): the signal follows
    the death of that thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Child:
    """Start `argv` in a new session (its own process group) with stdout+stderr appended to `log_path`;
    it dies with this process."""
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
            preexec_fn=die_with_parent(),
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
    """Turn SIGTERM and SIGHUP (the terminal closed) into KeyboardInterrupt (like Ctrl-C) for the
    duration, so all of them clean up the same way."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_term) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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
