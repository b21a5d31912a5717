"""A real swarm on 127.0.0.1 for the chaos tests and the soak/chaos benchmarks: `nord-coordinator serve`
(its `Authority`) and `nord-node join` workers, each in its own process group, restartable on its own
state dir (the coordinator on its own ports, so the workers' bootstrap address stays valid).

`ledger` is the check every chaos scenario ends with: every contribution a worker's log says was
acknowledged is in the coordinator's history exactly once and sealed into exactly one round.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from procs import Procs, _stat, alive, free_port, p2pd_children, wait_for

from coordinator.history import History
from node.session import replica_settings
from nord.config import RunConfig
from nord.crdt import Replica

SENT = re.compile(r"(?:re-)?sent contribution ([0-9a-f]{12}) for round (\d+) \(\d+ bytes\) to (\d+) peer")
WORDS = "thou art the sun and moon of spring that walks upon green hills where rivers sing".split()


def write_corpus(path: Path, paragraphs: int = 80) -> Path:
    """A small deterministic text (enough for a tiny tokenizer and a held-out split)."""
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(paragraphs)))
    return path


class Swarm(Procs):
    """The coordinator and the workers of one run under `tmp` (run.json, coord/, <worker>/, logs).

    `netns` puts peers in network namespaces (name -> (namespace, its address)), for partitions; the
    others, and by default all, listen on 127.0.0.1."""

    def __init__(self, tmp: Path, run: str = "chaos", netns: dict[str, tuple[str, str]] | None = None):
        super().__init__(tmp, env={"NORD_DATA_DIR": str(tmp / "data")})
        self.tmp, self.run, self.netns = tmp, run, netns or {}
        self.http, self.p2p = free_port(), free_port()
        self.running: dict[str, object] = {}
        self.daemon_of: dict[str, set[int]] = {}  # name -> the p2pd of its current process
        self.joins: dict[str, int] = {}  # worker -> times started
        self.maddr = ""
        self.quorum = 0

    def host(self, name: str) -> str:
        return self.netns.get(name, ("", "127.0.0.1"))[1]

    def spawn(self, name: str, module: str, *args: str):
        """`python -m module args` as `name`, inside its network namespace if it has one."""
        if name not in self.netns:
            return self.start(name, *args, module=module)
        inside = ("ip", "netns", "exec", self.netns[name][0])
        return self.start(name, *inside, sys.executable, "-m", module, *args)

    def get(self, path: str):
        url = f"http://{self.host('coord')}:{self.http}{path}"
        if "coord" not in self.netns:
            with urllib.request.urlopen(url, timeout=60) as r:
                return json.loads(r.read())
        curl = ["ip", "netns", "exec", self.netns["coord"][0], "curl", "-sf", "--max-time", "60", url]
        try:
            return json.loads(subprocess.run(curl, capture_output=True, timeout=90, check=True).stdout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise OSError(f"GET {url} in {self.netns['coord'][0]}: {e}") from None

    def sealed_rounds(self) -> int:
        return int(self.get("/api/summary")["sealed_rounds"])

    def init(self, *, quorum: int = 2, inner_steps: int = 3, batch_size: int = 2, seq_len: int = 32) -> None:
        """Write run.json: the tiny model on `write_corpus`'s text, short rounds, 2 checkpoints kept."""
        self.quorum = quorum
        init = self.start(
            "init", "init", "--run", self.run, "--model", "tiny",
            "--source", str(write_corpus(self.tmp / "text.txt")), "--vocab-size", "512",
            "--quorum", str(quorum), "--deadline", "600", "--inner-steps", str(inner_steps),
            "--batch-size", str(batch_size), "--seq-len", str(seq_len), "--keep-checkpoints", "2",
            "--out", str(self.tmp / "run.json"),
            module="coordinator",
        )  # fmt: skip
        assert init.wait(timeout=300) == 0, self.log("init")

    def start_coordinator(self, *extra: str) -> None:
        host = self.host("coord")
        proc = self.running["coord"] = self.spawn(
            "coord", "coordinator", "serve", "--run-config", str(self.tmp / "run.json"),
            "--state-dir", str(self.tmp / "coord"), "--http", f"{host}:{self.http}",
            "--host-maddrs", f"/ip4/{host}/tcp/{self.p2p}", "--local-only", "--val-batches", "1",
            "--max-loss-increase", "5", *extra,
        )  # fmt: skip
        wait_for(lambda: proc.poll() is not None or self.get("/api/summary"), 300, "the coordinator's API")
        assert proc.poll() is None, self.log("coord")
        self._track("coord", proc)
        self.maddr = self.get("/api/summary")["multiaddrs"][0]

    def join(self, name: str, *extra: str) -> None:
        listen = ("--host-maddrs", f"/ip4/{self.host(name)}/tcp/0") if name in self.netns else ()
        proc = self.running[name] = self.spawn(
            name, "node", "join", "--run", self.run, "--initial-peers", self.maddr,
            "--state-dir", str(self.tmp / name), "--poll-s", "0.3", "--no-progress", "--local-only",
            "--device", "cpu", *listen, *extra,
        )  # fmt: skip
        self._track(name, proc)
        self.joins[name] = self.joins.get(name, 0) + 1

    def _track(self, name: str, proc) -> None:
        self.record_daemon(proc)
        self.daemon_of[name] = p2pd_children(proc.pid)

    def kill(self, name: str) -> None:
        proc = self.running[name]
        assert proc.poll() is None, f"{name} died by itself:\n{self.log(name)}"
        proc.kill()
        proc.wait()

    def moment(self, name: str) -> str:
        """What `name` is doing now: a worker's phase (its status.json: training — which ends with the
        send — waiting, sealed); the coordinator's from its API and disk: `sealing` while the open round
        has its quorum pooled (scoring, sealing), `checkpoint` while the last seal's checkpoint is not on
        disk yet (checkpoint write, evaluation), else `between seals`."""
        if name != "coord":
            return json.loads((self.tmp / name / "status.json").read_text()).get("phase", "?")
        open_round = self.get("/api/rounds?limit=1")[-1]
        if open_round["sealed_at"] is None and open_round["pending"] >= self.quorum:
            return "sealing"
        sealed = self.sealed_rounds()
        if sealed and not (self.tmp / "coord" / "checkpoints" / f"{sealed - 1}.safetensors").exists():
            return "checkpoint"
        return "between seals"

    def kill_at_random_moment(
        self, victim: str, rng: random.Random, max_delay_s: float, on_checkpoint: bool = False
    ) -> dict:
        """Once the swarm has sealed one more round, SIGKILL `victim` after a random delay (wherever that
        lands: training, sending, scoring, sealing, writing a checkpoint) and restart it on its state dir.
        `on_checkpoint` (the coordinator): kill it the moment its next checkpoint file appears instead —
        the checkpoint write (its temporary file) or just after it (evaluation, history).

        Returns the round, what the victim was doing, and the p2pd of it still alive 60 s after the kill
        (its watchdog must end it)."""
        progressed = self.sealed_rounds() + 1
        if on_checkpoint and victim == "coord":
            moment = self._at_next_checkpoint()
        else:
            wait_for(lambda: self.sealed_rounds() >= progressed, 600, f"round {progressed} sealed")
            time.sleep(rng.uniform(0.0, max_delay_s))
            try:
                moment = self.moment(victim)
            except (OSError, ValueError, KeyError):  # status.json mid-rewrite, API busy: kill anyway
                moment = "?"
        daemons = self.daemon_of[victim]
        self.kill(victim)
        deadline = time.monotonic() + 60
        while (left := {d for d in daemons if alive(d)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        if victim == "coord":
            self.start_coordinator()
        else:
            self.join(victim)
        return {"victim": victim, "after_round": progressed, "moment": moment, "p2pd_left": sorted(left)}

    def _at_next_checkpoint(self, timeout_s: float = 600) -> str:
        """Return (for the kill) as soon as a new file appears in the coordinator's checkpoints dir:
        `checkpoint write` while a file of it is not a finished `<round>.safetensors`, else `after
        checkpoint`. Polled every few ms: the write of the tiny model's 3.3 MB is short."""
        folder = self.tmp / "coord" / "checkpoints"
        before = set(os.listdir(folder))
        deadline = time.monotonic() + timeout_s
        while not (new := set(os.listdir(folder)) - before):
            assert time.monotonic() < deadline, "no new checkpoint"
            time.sleep(0.002)
        done = re.compile(r"\d+\.safetensors")
        return "after checkpoint" if all(done.fullmatch(n) for n in new) else "checkpoint write"

    def leftovers(self) -> list[int]:
        """Live processes still in a process group this swarm started (each of its processes leads one)."""
        groups = {p.pid for p in self.procs}
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = _stat(int(entry.name))
                except (OSError, IndexError):
                    continue
                if fields[0] != "Z" and int(fields[2]) in groups:
                    left.append(int(entry.name))
        return left

    def finish_workers(self, names: list[str], timeout_s: float = 600) -> None:
        """Stop `names` cleanly, then run each for one more sealed round: every replica ends on a seal."""
        live = [name for name in names if name in self.running and self.running[name].poll() is None]
        for name in live:  # a worker restarted just before is up (this stop is not a kill at startup)
            joined = lambda n=name: self.log(n, tail=10**9).count("joined run ") >= self.joins[n]  # noqa: E731
            wait_for(joined, 600, f"{name} joined")
        for name in live:
            self.running[name].terminate()
        for name in live:
            rc = self.running[name].wait(timeout=120)
            assert rc == 0, f"{name} exited {rc} on SIGTERM:\n{self.log(name)}"
        for name in names:
            self.join(name, "--max-rounds", "1")
        deadline = time.monotonic() + timeout_s
        while any(self.running[n].poll() is None for n in names):
            assert time.monotonic() < deadline, f"workers still running {timeout_s:.0f} s after their restart"
            for n in names:
                assert self.running[n].poll() in (None, 0), f"{n} failed:\n{self.log(n)}"
            for n in self._left_the_open_round(names):  # it counted a seal it caught up with as its round
                self.join(n, "--max-rounds", "1")
            time.sleep(1.0)

    def _left_the_open_round(self, names: list[str]) -> list[str]:
        """The workers of `names` that have exited while the open round cannot reach its quorum without
        them: every one still running has sent its contribution for it."""
        exited = [n for n in names if self.running[n].poll() is not None]
        if not exited or len(exited) == len(names):
            return []
        open_round = self.get("/api/rounds?limit=1")[-1]
        if open_round["sealed_at"] is not None or open_round["pending"] >= self.quorum:
            return []
        for n in names:
            sent = {int(m[2]) for m in SENT.finditer(self.log(n, tail=10**9))}
            if n not in exited and open_round["round"] not in sent:
                return []
        return exited


def sealed_hash(state_dir: Path) -> str:
    """The sealed weights a stopped peer's replica (on disk) builds on."""
    replica = Replica.open(state_dir / "replica", **replica_settings(RunConfig.load(state_dir / "run.json")))
    try:
        return replica.base_hash
    finally:
        replica.close()


def acknowledged(log: str) -> set[str]:
    """Ids (12-hex prefixes) of the contributions a worker's log says at least one peer accepted."""
    return {m[1] for m in SENT.finditer(log) if int(m[3]) >= 1}


def ledger(swarm: Swarm, workers: list[str]) -> dict:
    """What a stopped swarm's coordinator history says of every acknowledged contribution.

    Returns the counts and the offending ids: `lost` (acknowledged, not sealed exactly once),
    `double_folded` (rounds that fold two contributions of one peer), `empty_seals`, `last_sealed`
    (the newest sealed round's row) and `stale_replicas` (peers whose replica is not on its weights).
    """
    history = History.open(swarm.tmp / "coord" / "history.sqlite")
    try:
        rows = history.contributions()
        sealed = [r for r in history.rounds() if r["weights_hash"]]
    finally:
        history.close()
    acked = {p for name in workers for p in acknowledged(swarm.log(name, tail=10**9))}
    lost = []
    for prefix in sorted(acked):
        matches = [r for r in rows if r["id"].startswith(prefix)]
        if len(matches) != 1 or matches[0]["sealed_in"] is None:
            lost.append((prefix, matches))
    double, empty = [], []
    for r in sealed:
        folded = [c["peer"] for c in rows if c["sealed_in"] == r["round"]]
        if not folded:
            empty.append(r["round"])
        elif len(folded) != len(set(folded)):
            double.append(r["round"])
    last = sealed[-1] if sealed else None
    stale = [n for n in ("coord", *workers) if not last or sealed_hash(swarm.tmp / n) != last["weights_hash"]]
    return {
        "acknowledged": len(acked), "lost": lost, "double_folded": double, "empty_seals": empty,
        "sealed_rounds": len(sealed), "last_sealed": last, "stale_replicas": stale,
    }  # fmt: skip


def assert_nothing_lost(swarm: Swarm, workers: list[str], final_summary: dict) -> None:
    """The chaos tests' verdict on a stopped swarm: every acknowledged contribution sealed exactly once,
    no round folding two of one peer or none, every replica on the newest seal (`ledger`)."""
    book = ledger(swarm, workers)
    assert book["acknowledged"] > 0
    assert not book["lost"], book["lost"]
    assert not book["double_folded"] and not book["empty_seals"], book
    assert book["last_sealed"]["round"] == final_summary["sealed_rounds"] - 1
    assert not book["stale_replicas"], book["stale_replicas"]
