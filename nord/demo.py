"""`nord demo`: a whole swarm on this machine — coordinator, workers and dashboard — in one command.

The demo prepares the default corpus (cached), writes a small run config, then starts
`nord-coordinator serve` and N `nord-node join` workers (the last one in client mode, as a peer behind
NAT would be) as subprocesses on 127.0.0.1. It prints the dashboard URL and the join command another
machine would use, one status line per sealed round, and at the end pulls the merged checkpoint over
HTTP, exactly as a user would, and prints the `nord generate` command that loads it.

Every child runs in its own process group (session), so Ctrl-C in the terminal reaches only the demo,
which then stops the children in order: SIGTERM to each group, SIGKILL to what is left after a timeout
(this also catches the hivemind DHT process and its Go `p2pd` daemon, which share the group).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nord.errors import ConfigError, NordError

log = logging.getLogger(__name__)

RUN_ID = "demo"
MARKER = ".nord-demo"  # written into the state dir; --fresh deletes only directories that carry it
STOP_TIMEOUT_S = 10.0  # SIGTERM grace period per process group before SIGKILL
PROMPT = "ROMEO:"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What `nord demo` starts; validated so a bad flag fails before any process is spawned."""

    workers: int = 3
    rounds: int | None = None  # None: run until Ctrl-C
    model: str = "small"
    inner_steps: int = 20
    http: str = "127.0.0.1:8080"
    host: str = "127.0.0.1"  # the coordinator's listen address; 0.0.0.0 lets other machines join
    state_dir: Path = Path("~/.nord/demo")
    fresh: bool = False
    ready_timeout_s: float = 120.0  # coordinator start (includes the first torch import)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.inner_steps < 1:
            raise ConfigError(f"--inner-steps must be >= 1, got {self.inner_steps}")
        http_host, _ = split_host_port(self.http)
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())
        if not http_host:
            raise ConfigError(f"--http needs HOST:PORT, got {self.http!r}")

    @property
    def dashboard_url(self) -> str:
        host, port = split_host_port(self.http)
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT with a port in 1-65535, got {value!r}")
    return host, int(port)


def free_port(host: str) -> int:
    """A TCP port the OS says is free now (for the coordinator's libp2p listen address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


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


# ----------------------------------------------------------------------------------------------------
# Talking to the coordinator
# ----------------------------------------------------------------------------------------------------


def get_json(url: str, timeout_s: float = 5.0):
    """GET `url` as JSON; None when the server is not (yet) answering."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.loads(resp.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


def wait_until_ready(coordinator: Child, url: str, timeout_s: float) -> dict:
    """Poll `/api/summary` until the coordinator answers with its multiaddrs; fail fast if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if coordinator.proc.poll() is not None:
            raise NordError(
                f"the coordinator exited with code {coordinator.proc.returncode} while starting; "
                f"last lines of {coordinator.log_path}:\n{coordinator.log_tail()}"
            )
        summary = get_json(f"{url}/api/summary")
        if summary and summary.get("multiaddrs"):
            return summary
        time.sleep(0.5)
    raise NordError(
        f"the coordinator did not answer on {url} within {timeout_s:.0f} s; see {coordinator.log_path}"
    )


def round_line(summary: dict, metrics: list[dict], elapsed_s: float) -> str:
    """One status line for the latest sealed round: loss, peers, contributions, bytes."""
    last = metrics[-1] if metrics else {}
    loss = last.get("val_loss")
    loss_text = f"val loss {loss:.3f}" if isinstance(loss, (int, float)) else "val loss –"
    return (
        f"round {summary['sealed_rounds']:>3} sealed  {loss_text}  "
        f"peers {summary.get('peers_online', 0)}  contributions {last.get('accepted', 0)}  "
        f"{(last.get('bytes') or 0) / 1024:.1f} KiB  ({elapsed_s:.0f} s)"
    )


# ----------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------


def prepare_state_dir(cfg: DemoConfig) -> None:
    """Create the state dir; with --fresh, delete it first — but only if an earlier demo made it."""
    state = cfg.state_dir
    if cfg.fresh and state.exists():
        if not (state / MARKER).is_file() and any(state.iterdir()):
            raise ConfigError(
                f"--fresh refuses to delete {state}: it is not empty and was not made by `nord demo`"
            )
        shutil.rmtree(state)
    state.mkdir(parents=True, exist_ok=True)
    (state / MARKER).touch()


def child_env(cfg: DemoConfig) -> dict[str, str]:
    """Children share the corpus under the state dir and split the cores instead of oversubscribing them."""
    threads = max(1, (os.cpu_count() or 2) // cfg.workers)
    env = dict(os.environ)
    env.update(
        NORD_DATA_DIR=str(cfg.state_dir / "data"),
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    return env


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a coordinator, workers and the dashboard on this machine",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--workers", type=int, default=DemoConfig.workers, help="workers to start (the last in client mode)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, metavar="K", help="stop after K sealed rounds (default: Ctrl-C)"
    )
    p.add_argument("--model", default=DemoConfig.model, help="model recipe: tiny, small, base, nord-1b")
    p.add_argument("--inner-steps", type=int, default=DemoConfig.inner_steps, help="H: local steps per round")
    p.add_argument("--http", default=DemoConfig.http, metavar="HOST:PORT", help="dashboard address")
    p.add_argument(
        "--host", default=DemoConfig.host, help="coordinator listen address (0.0.0.0: let others join)"
    )
    p.add_argument("--state-dir", type=Path, default=DemoConfig.state_dir, help="where everything is kept")
    p.add_argument("--fresh", action="store_true", help="delete the state dir of an earlier demo first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(
        workers=args.workers,
        rounds=args.rounds,
        model=args.model,
        inner_steps=args.inner_steps,
        http=args.http,
        host=args.host,
        state_dir=args.state_dir,
        fresh=args.fresh,
    )
    raise NordError(f"nord demo is not wired up yet ({cfg.state_dir})")
