"""Stream and handler attacks on a real peer, each attacker its own process (tests/security/streams_peer.py):
20 streams that claim 97 MiB and send nothing, a slow drip, type-confused gossip requests. The victim's
memory stays bounded, it keeps answering other peers, every attacker gets a one-line reason, and its log
holds no traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest
from procs import stop_processes, wait_for

from nord.errors import TransportError
from nord.gossip import hello
from nord.gossip.wire import MAX_DELTA_BYTES
from nord.transport import Transport, TransportConfig, peer_id_of

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = str(Path(__file__).with_name("streams_peer.py"))
RUN = "crdt-test"  # the test replica's run (tests/nord/crdt_support.py)
IDLE_S = 20  # the victim's idle timeout: long enough to measure it while the flood's streams are held
FLOOD = 20
PER_PEER = TransportConfig().max_streams_per_peer
RSS_GROWTH_LIMIT = 64 << 20


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Attacker:
    """A hostile peer process whose stdout lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_line(self, pred, timeout_s: float) -> str:
        """The first line printed so far that satisfies `pred`, waiting up to `timeout_s`."""
        try:
            return wait_for(lambda: next((x for x in self.lines if pred(x)), None), timeout_s, "a line")
        except AssertionError:
            self.proc.kill()
            err = self.proc.stderr.read()[-2000:]
            raise AssertionError(f"attacker printed {self.lines}; stderr: {err}") from None


@pytest.fixture
def victim():
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, "victim", str(IDLE_S)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        addr = proc.stdout.readline().strip()
        assert addr.startswith("/ip4/127.0.0.1/"), proc.stderr.read()
        yield proc, addr
    finally:
        stop_processes([proc], timeout_s=30)


def test_stream_flood_drip_and_type_confusion_leave_the_victim_bounded_and_serving(victim):
    proc, addr = victim
    target = peer_id_of(addr)
    attackers: list[Attacker] = []
    with Transport.start(TransportConfig(local_only=True, initial_peers=(addr,))) as observer:
        for _ in range(3):  # warm the victim's handler path before the baseline
            assert hello(observer, target, RUN)["role"] == "coordinator"
        before = rss_bytes(proc.pid)
        try:
            flood = Attacker("flood", addr, str(FLOOD))
            drip = Attacker("drip", addr, "2")
            attackers += [flood, drip]
            flood.wait_line(lambda line: line == "holding", 120)
            # the flood's streams are open, their headers taken: the victim still answers, in bounded memory
            peak = before
            for _ in range(5):
                assert hello(observer, target, RUN)["round"] == 0
                peak = max(peak, rss_bytes(proc.pid))
            growth = peak - before
            print(f"victim RSS {before / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB under {FLOOD} streams")
            assert growth < RSS_GROWTH_LIMIT, f"victim RSS grew {growth / 2**20:.0f} MiB"
            type_confused = [
                ("fetch", {"run_id": RUN, "ids": ids}, "ids must be a list") for ids in (5, True, [[1]])
            ] + [("fetch", {"run_id": 7, "ids": []}, "run_id is not a run id")]
            for name, fields, message in type_confused:
                with pytest.raises(TransportError, match=message):
                    observer.request(target, name, msgpack.packb(fields, use_bin_type=True))
            replies = json.loads(flood.wait_line(lambda line: line.startswith("{"), IDLE_S + 120))["replies"]
            dripped = json.loads(drip.wait_line(lambda line: line.startswith("{"), IDLE_S + 120))
        finally:
            stop_processes([a.proc for a in attackers], timeout_s=30)
        assert hello(observer, target, RUN)["round"] == 0
    refused = [r for r in replies if "too many concurrent streams from your peer" in r]
    cut = [
        r for r in replies if f"stalled after 0 of {MAX_DELTA_BYTES} bytes for {IDLE_S} s; stream cut" in r
    ]
    assert len(refused) == FLOOD - PER_PEER and len(cut) == PER_PEER, replies
    assert f"sent no message for {IDLE_S} s; stream cut" in dripped["reply"], dripped
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "stopped" in out and proc.returncode == 0
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
