"""HTTP limits against a real uvicorn server process: oversized and unauthenticated bodies are refused from
their headers (or after the first 64 KiB of a chunked body), without the server buffering them.

Run as a script (`python test_http_limits.py HISTORY TOKEN`), this file is that server: the coordinator's
app over a real history (checkpoints beside it), on a free 127.0.0.1 port that it prints;
bench/http_attacks.py runs it on this tree and on older ones.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PEERS
from procs import stop_processes

from coordinator.history import History

pytestmark = pytest.mark.timeout(300)

BODY_BYTES = 200 * 1000 * 1000  # what the probe claims (or starts to stream): 200 MB
CHUNK = b"x" * (1 << 20)
RSS_GROWTH_LIMIT = 64 * 1024 * 1024
TOKEN = "s3cret"


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status size field in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@pytest.fixture
def server(tmp_path):
    History.open(tmp_path / "history.sqlite").close()
    proc = subprocess.Popen(
        [sys.executable, __file__, str(tmp_path / "history.sqlite"), TOKEN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # this file imports test helpers
    )
    try:
        line = proc.stdout.readline()  # blocks until the server listens (or dies)
        assert line.startswith("port "), proc.stderr.read()
        yield proc, int(line.split()[1])
    finally:
        stop_processes([proc], timeout_s=30)


def post(port: int, path: str, headers: dict[str, str], *, chunked: bool) -> tuple[int, dict, int]:
    """POST up to BODY_BYTES to `path`, stopping as soon as the server answers; return (status, JSON body,
    bytes sent). With `chunked`, the body goes without a Content-Length."""
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", **headers}
    head |= {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(BODY_BYTES)}
    frame = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\n".encode() + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in head.items()) + b"\r\n")  # fmt: skip
        s.setblocking(False)
        while sent < BODY_BYTES:
            readable, writable, _ = select.select([s], [s], [], 120)
            if readable or not writable:
                break
            try:
                sent += s.send(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(120)  # back to blocking reads, with a deadline
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # the server closed with part of our body unread; its answer came first
    head_bytes, _, body = reply.partition(b"\r\n\r\n")
    assert head_bytes, f"no answer after {sent} bytes sent"
    return int(head_bytes.split()[1]), json.loads(body), sent


def test_big_bodies_are_refused_before_the_server_reads_them(server):
    proc, port = server
    before = _status(proc.pid, "VmRSS")
    ban = f"/api/admin/ban/{PEERS[0]}"
    status, body, sent = post(port, ban, {}, chunked=False)
    assert status == 401 and "Bearer" in body["error"], body
    status, body, _ = post(port, ban, {"Authorization": "Bearer wrong"}, chunked=True)
    assert status == 401 and "wrong admin token" in body["error"]
    status, body, _ = post(port, ban, {"Authorization": f"Bearer {TOKEN}"}, chunked=False)
    assert status == 413 and "limit" in body["error"]
    status, body, _ = post(port, ban, {"Authorization": f"Bearer {TOKEN}"}, chunked=True)
    assert status == 413 and "limit" in body["error"]
    status, body, _ = post(port, "/api/summary", {}, chunked=False)  # not an admin path: still capped
    assert status == 413
    growth = _status(proc.pid, "VmHWM") - before
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew by {growth / 2**20:.0f} MiB"
    assert sent < BODY_BYTES


class Admin:
    """The admin actions the served app would call (never reached here: every request is refused)."""

    def revoke(self, contribution_id, *, reason, by):
        raise AssertionError("revoke reached")

    def ban(self, peer, *, reason, by):
        raise AssertionError("ban reached")


def _serve(history_path: str, token: str) -> None:
    import uvicorn

    from coordinator.api import ApiContext, create_app

    try:
        from coordinator.history import HistoryReader

        history = HistoryReader(history_path)
    except ImportError:  # a tree before HistoryReader (bench/http_attacks.py --ref): its API took History
        history = History.open(history_path)
    ctx = ApiContext(
        history=history,
        run_config={"run_id": "limits", "rounds": {"quorum": 2, "deadline_s": 60.0}},
        checkpoint_dir=Path(history_path).parent,
        model={},
        admin=Admin(),
        admin_token=token,
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # connections wait in the backlog until uvicorn accepts them
    print("port", sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(create_app(ctx), log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    _serve(*sys.argv[1:3])
