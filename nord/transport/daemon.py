"""Process hygiene of a peer: its identity file, the lock that keeps a second node off it, the watchdog
that ends p2pd when the node dies without `shutdown()` (even SIGKILL), and p2pd errors in plain words.

hivemind starts p2pd as a child process; if the Python parent dies abruptly, p2pd keeps running with the
peer's identity (so the restarted node would find it "already taken") and leaves its unix sockets in /tmp.
The watchdog is a tiny separate process holding a pipe from the node: EOF on it means the node is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hivemind.p2p import P2P
from hivemind.utils.logging import use_hivemind_log_handler

from nord.errors import TransportError
from nord.fsutil import fsync_dir
from nord.transport.config import TransportConfig

SHUTDOWN_NOISE = "use of closed network connection"  # p2pd's accept loops, as their sockets close


class _ShutdownNoise(logging.Filter):
    """p2pd logs its listeners closing at shutdown as errors: expected, so kept at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if SHUTDOWN_NOISE in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def use_nord_logging() -> None:
    """hivemind's (and p2pd's) messages in the application's log format, without p2pd's shutdown noise
    (idempotent: every Transport.start calls it)."""
    use_hivemind_log_handler("nowhere")  # propagate to the root logger instead of hivemind's own handler
    p2pd = logging.getLogger("hivemind.p2p.p2p_daemon")
    if not any(isinstance(f, _ShutdownNoise) for f in p2pd.filters):
        p2pd.addFilter(_ShutdownNoise())


def ensure_identity(path: Path) -> Path:
    """Create the libp2p identity file atomically if missing (hivemind writes it in place)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        P2P.generate_identity(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    return path


def lock_identity(identity: Path) -> Any:
    """Hold an exclusive lock beside the identity for the node's lifetime (released by the OS on any exit)."""
    identity.parent.mkdir(parents=True, exist_ok=True)
    lock = open(identity.with_name(identity.name + ".lock"), "a+")  # noqa: SIM115 - held until shutdown
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise TransportError(
            f"identity {identity} is in use by another running node (pid {holder}); "
            "stop it or use another --state-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


# Runs in a tiny separate process: waits for EOF on stdin (the node died) unless told to stand down first,
# then ends p2pd and removes the unix sockets the dead node would have left in /tmp.
_WATCHDOG = """
import os, signal, sys, time
pid, paths = int(sys.argv[1]), sys.argv[2:]
if sys.stdin.buffer.read(1) == b"":
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in paths:
        try:
            os.remove(p)
        except OSError:
            pass
"""


def start_watchdog(p2p: P2P) -> subprocess.Popen | None:
    child = getattr(p2p, "_child", None)
    if child is None:
        return None
    sockets = [str(m["unix"]) for m in (p2p._daemon_listen_maddr, p2p._client_listen_maddr)]
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(child.pid), *sockets],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C must not reach it
    )


def stand_down(watchdog: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, ValueError):
        watchdog.stdin.write(b"x")
        watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(timeout=5)


def explain_daemon_error(message: str, cfg: TransportConfig) -> str:
    low = message.lower()
    if "address already in use" in low:
        return (
            f"p2pd could not listen on {', '.join(cfg.resolved_host_maddrs())}: port already in use; "
            "pick a free port in --host-maddrs (or tcp/0 for any)"
        )
    if "failed to connect to bootstrap peers" in low:
        return bootstrap_unreachable(cfg)
    if "already taken" in low:
        return (
            f"identity {cfg.identity_path} is already used by another peer of this swarm; "
            "stop that node or use another --state-dir"
        )
    if "failed to start in" in low:
        return f"p2pd did not start within {cfg.startup_timeout_s:.0f} s (overloaded?): {first_line(message)}"
    return f"p2pd failed to start: {first_line(message)}"


def bootstrap_unreachable(cfg: TransportConfig) -> str:
    return (
        f"bootstrap unreachable: none of {', '.join(cfg.initial_peers)} answered; "
        "check that it is running and that the address is current "
        "(it changes when that peer restarts without a fixed port)"
    )


def first_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
