"""`nord demo`: a whole swarm on this machine — coordinator, workers and dashboard — in one command.

The demo prepares the default corpus (cached), writes a small run config, then starts
`nord-coordinator serve` and N `nord-node join` workers (the last one in client mode, as a peer behind
NAT would be) as subprocesses on 127.0.0.1. It prints the dashboard URL and the join command another
machine would use, one status line per sealed round, and at the end pulls the merged checkpoint over
HTTP, exactly as a user would (weights checked against the authority's seal, the authority pinned to the
fingerprint the banner printed, the tokenizer saved beside them), and prints the `nord generate` command
that loads it.

Every child runs in its own process group (session), so Ctrl-C in the terminal reaches only the demo,
which then stops the children it started, by process group: SIGTERM to each group, SIGKILL to what is
left after a timeout (this also catches each child's Go `p2pd` daemon, which shares its group). If the
demo is killed outright, the kernel kills its children with it (nord.demo.processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nord.checks import fingerprint, host_port
from nord.demo.processes import (
    Child,
    die_with_parent,
    signals_ignored_while_stopping,
    spawn,
    stop_children,
    stop_signals_raise,
)
from nord.errors import ConfigError, NordError

log = logging.getLogger(__name__)

RUN_ID = "demo"
MARKER = ".nord-demo"  # written into the state dir; --fresh deletes only directories that carry it
PROMPT = "ROMEO:"
# Chosen so that a round takes about a minute with three workers on two CPU cores (README.md, "Two commands").
DEFAULT_INNER_STEPS = {"tiny": 50, "small": 10}
DEMO_SEQ_LEN = 128
ROUND_DEADLINE_S = 120.0  # a round seals without a slow worker's contribution after this long


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What `nord demo` starts; validated so a bad flag fails before any process is spawned."""

    workers: int = 3
    rounds: int | None = None  # None: run until Ctrl-C
    model: str = "small"
    inner_steps: int | None = None  # None: the model's entry in DEFAULT_INNER_STEPS
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
        if self.inner_steps is None:
            object.__setattr__(self, "inner_steps", DEFAULT_INNER_STEPS.get(self.model, 10))
        if self.inner_steps < 1:
            raise ConfigError(f"--inner-steps must be >= 1, got {self.inner_steps}")
        split_host_port(self.http)
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def dashboard_url(self) -> str:
        host, port = split_host_port(self.http)
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"


def split_host_port(value: str) -> tuple[str, int]:
    parsed = host_port(value)
    if parsed is None or parsed[1] == 0:
        raise ConfigError(f"--http needs HOST:PORT with a port in 1-65535, got {value!r}")
    return parsed


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
                f"the coordinator exited with code {coordinator.proc.returncode} while starting: "
                f"{coordinator.last_words()}"
            )
        summary = get_json(f"{url}/api/summary")
        if summary and summary.get("multiaddrs"):
            return summary
        time.sleep(0.5)
    raise NordError(
        f"the coordinator did not answer on {url} within {timeout_s:.0f} s; see {coordinator.log_path}"
    )


def round_line(summary: dict, metrics: list[dict], elapsed_s: float, progress: str = "") -> str:
    """One status line per sealed round: held-out loss, firing rate, peers, contributions, bytes.

    `progress` (e.g. "2 of 6") says how far the demo is toward its --rounds."""
    last = metrics[-1] if metrics else {}

    def number(key: str, fmt: str) -> str:
        value = last.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "–"

    kib = (last.get("bytes") or 0) / 1024
    return " | ".join(
        [
            f"round {last.get('round', summary['sealed_rounds'] - 1):>3} sealed"
            + (f" ({progress})" if progress else ""),
            f"val loss {number('val_loss', '.3f')}",
            f"firing rate {number('firing_rate_mean', '.3f')}",
            f"peers {summary.get('peers_online', 0)}",
            f"contributions {last.get('accepted', 0)} ({kib:.0f} KiB)",
            f"{elapsed_s:.0f} s",
        ]
    )


def watch(cfg: DemoConfig, coordinator: Child, workers: list[Child], *, start_sealed: int) -> None:
    """Print a line per sealed round until `cfg.rounds` more are sealed (or forever); fail if peers die."""
    url = cfg.dashboard_url
    sealed = start_sealed
    round_started = time.monotonic()
    reported_dead: set[str] = set()
    while cfg.rounds is None or sealed - start_sealed < cfg.rounds:
        time.sleep(1.0)
        if coordinator.proc.poll() is not None:
            raise NordError(
                f"the coordinator exited with code {coordinator.proc.returncode}: {coordinator.last_words()}"
            )
        for w in workers:
            if w.proc.poll() is not None and w.name not in reported_dead:
                reported_dead.add(w.name)
                print(f"{w.name} exited with code {w.proc.returncode}; see {w.log_path}", file=sys.stderr)
        if len(reported_dead) == len(workers):
            raise NordError(f"every worker exited: {workers[0].last_words()}")
        summary = get_json(f"{url}/api/summary")
        if not summary or summary["sealed_rounds"] <= sealed:
            continue
        sealed = summary["sealed_rounds"]
        metrics = get_json(f"{url}/api/metrics") or []
        progress = f"{sealed - start_sealed} of {cfg.rounds}" if cfg.rounds else ""
        print(round_line(summary, metrics, time.monotonic() - round_started, progress), flush=True)
        round_started = time.monotonic()


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
    """Children split the cores instead of each starting one torch thread per core."""
    threads = max(1, (os.cpu_count() or 2) // cfg.workers)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )
    return env


def ensure_run_config(cfg: DemoConfig, env: dict[str, str]) -> Path:
    """The demo run's config: created by `nord-coordinator init` (which also prepares the corpus) once."""
    from nord.config import RunConfig
    from nord.recipes import get_config

    run_json = cfg.state_dir / "run.json"
    if not run_json.is_file():
        argv = [sys.executable, "-m", "coordinator", "init", "--run", RUN_ID, "--model", cfg.model]
        argv += ["--out", str(run_json), "--data-dir", str(cfg.data_dir), "--quorum", str(cfg.workers)]
        argv += ["--deadline", str(ROUND_DEADLINE_S), "--inner-steps", str(cfg.inner_steps)]
        argv += ["--seq-len", str(min(DEMO_SEQ_LEN, get_config(cfg.model).max_seq_len))]
        print(f"preparing the corpus and the run config ({cfg.model} model)…", flush=True)
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
        if done.returncode != 0 or not run_json.is_file():
            raise NordError(
                f"`nord-coordinator init` failed (exit code {done.returncode}); see its output above"
            )
    run = RunConfig.load(run_json)
    wanted = get_config(cfg.model, vocab_size=run.model.vocab_size)
    if run.model != wanted:
        raise ConfigError(
            f"{cfg.state_dir} holds a demo of another model than {cfg.model!r}; add --fresh to start over"
        )
    return run_json


def serve_argv(cfg: DemoConfig, run_json: Path) -> list[str]:
    argv = [sys.executable, "-m", "coordinator", "serve", "--run-config", str(run_json)]
    argv += ["--state-dir", str(cfg.state_dir / "coordinator"), "--data-dir", str(cfg.data_dir)]
    argv += ["--http", cfg.http]
    argv += ["--host-maddrs", f"/ip4/{cfg.host}/tcp/0"]  # port 0: the coordinator keeps its first port
    if cfg.host == "127.0.0.1":
        argv.append("--local-only")
    return argv


def print_banner(cfg: DemoConfig, summary: dict) -> None:
    rounds = f"for {cfg.rounds} round(s)" if cfg.rounds else "until Ctrl-C"
    print(f"dashboard:  {cfg.dashboard_url}")
    loopback_note = " (start the demo with --host 0.0.0.0 first)" if cfg.host == "127.0.0.1" else ""
    print(f"join from another machine{loopback_note}:")
    remote = [m for m in summary["multiaddrs"] if not m.startswith("/ip4/127.")] or summary["multiaddrs"]
    authority = f" --authority {fingerprint(summary['authority'])}" if summary.get("authority") else ""
    print(f"  nord-node join --initial-peers {remote[0]} --run {RUN_ID}{authority}")
    print(f"{cfg.workers} worker(s) training {cfg.model} {rounds}; logs in {cfg.state_dir}", flush=True)
    if summary.get("sealed_rounds"):
        print(
            f"resuming the run in {cfg.state_dir}: {summary['sealed_rounds']} round(s) already sealed"
            " (--fresh starts over)",
            flush=True,
        )


def pull_checkpoint(cfg: DemoConfig, env: dict[str, str], authority: str | None) -> Path | None:
    """Download the latest sealed weights from the coordinator as a user would (`nord-node pull`), requiring
    `authority` (hex, the key the coordinator announced at start) rather than trusting it on first use."""
    summary = get_json(f"{cfg.dashboard_url}/api/summary")
    if not summary or summary.get("sealed_rounds", 0) < 1:
        return None
    out = cfg.state_dir / "checkpoint.safetensors"
    argv = [sys.executable, "-m", "node", "pull", "--from", cfg.dashboard_url, "--out", str(out)]
    if authority:
        argv += ["--authority", fingerprint(authority)]
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=120, preexec_fn=die_with_parent()
        )
    except subprocess.TimeoutExpired:
        log.warning("pulling the checkpoint from %s timed out", cfg.dashboard_url)
        return None
    if done.returncode != 0:
        log.warning("could not pull the checkpoint: %s", (done.stderr.strip().splitlines() or ["?"])[-1])
        return None
    print(done.stdout.strip(), flush=True)  # "wrote …: weights sealed in round R …"
    return out


def worker_argv(cfg: DemoConfig, index: int, bootstrap: list[str]) -> list[str]:
    """Worker `index`: a public peer, except the last of two or more, which runs in client mode (NAT)."""
    argv = [sys.executable, "-m", "node", "join", "--run", RUN_ID, "--initial-peers", *bootstrap]
    argv += ["--state-dir", str(cfg.state_dir / f"worker-{index}"), "--data-dir", str(cfg.data_dir)]
    argv += ["--device", "cpu", "--no-progress"]
    if cfg.host == "127.0.0.1":
        argv.append("--local-only")
    if cfg.workers >= 2 and index == cfg.workers - 1:
        argv.append("--client-mode")
    else:
        argv += ["--host-maddrs", f"/ip4/{cfg.host}/tcp/0"]
    return argv


def shut_down(
    cfg: DemoConfig,
    env: dict[str, str],
    coordinator: Child | None,
    workers: list[Child],
    authority: str | None,
) -> Path | None:
    """Pull the merged checkpoint while the coordinator still serves it (signed by `authority`), then stop
    every child at once. Returns the checkpoint (None if no round was sealed)."""
    checkpoint = None
    if coordinator is not None and coordinator.proc.poll() is None:
        checkpoint = pull_checkpoint(cfg, env, authority)
    started = time.monotonic()
    stop_children([*workers, *([coordinator] if coordinator else [])])
    log.info("stopped %d process group(s) in %.1f s", len(workers) + 1, time.monotonic() - started)
    return checkpoint


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
    p.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="H: local steps per round (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_INNER_STEPS.items())
        + ")",
    )
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
    with stop_signals_raise():  # SIGTERM cleans up exactly like Ctrl-C, in every phase
        return run_demo(cfg)


def run_demo(cfg: DemoConfig) -> int:
    prepare_state_dir(cfg)
    env = child_env(cfg)
    run_json = ensure_run_config(cfg, env)
    coordinator: Child | None = None
    workers: list[Child] = []
    checkpoint: Path | None = None
    authority: str | None = None  # the coordinator's key as it announced it at start: the pull requires it
    interrupted = False
    try:
        coordinator = spawn("coordinator", serve_argv(cfg, run_json), cfg.state_dir / "coordinator.log", env)
        summary = wait_until_ready(coordinator, cfg.dashboard_url, cfg.ready_timeout_s)
        authority = summary.get("authority")
        print_banner(cfg, summary)
        for i in range(cfg.workers):
            workers.append(
                spawn(
                    f"worker-{i}",
                    worker_argv(cfg, i, summary["multiaddrs"]),
                    cfg.state_dir / f"worker-{i}.log",
                    env,
                )
            )
        watch(cfg, coordinator, workers, start_sealed=summary["sealed_rounds"])
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the workers and the coordinator…", file=sys.stderr)
    finally:
        with signals_ignored_while_stopping():
            checkpoint = shut_down(cfg, env, coordinator, workers, authority)
    if checkpoint is None:
        print(f"no round was sealed yet, so there is no checkpoint; logs are in {cfg.state_dir}")
    else:
        print(f"merged checkpoint: {checkpoint}\ngenerate text with:")
        print(f"  nord generate {checkpoint} --prompt {PROMPT!r}")
    return 130 if interrupted else 0
