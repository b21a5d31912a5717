"""nord.transport on 127.0.0.1: framed request/reply, limits, protocol versions, DHT records, hygiene,
stream caps, cancelled timeouts, handlers no peer can starve."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from procs import wait_for

from nord.errors import CodecError, ConfigError, TransportError
from nord.transport import HANDLER_PREFIX, Transport, TransportConfig
from nord.transport.frames import HEADER, KIND_OK, KIND_REQUEST, MAGIC, TRAILER_BYTES

pytestmark = [pytest.mark.p2p, pytest.mark.timeout(120)]


def p2pd_pids() -> set[int]:
    """Every live p2pd process on this machine."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "p2pd":
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def children_p2pd(pid: int) -> set[int]:
    found = set()
    for child in p2pd_pids():
        try:
            ppid = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.add(child)
    return found


def node_sockets(daemons: set[int]) -> list[Path]:
    """The daemon and client unix sockets of a node, named after the p2pd's -listen socket."""
    (pid,) = daemons
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    listen = next(a.decode() for a in args if a.startswith(b"-listen="))
    daemon_socket = Path(listen.removeprefix("-listen=/unix"))
    return [daemon_socket, daemon_socket.with_name(daemon_socket.name.replace("p2pd-", "p2pclient-"))]


def wait_gone(pids: set[int], timeout_s: float = 10) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}
        if not pids:
            break
        time.sleep(0.1)
    return pids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module")
def pair():
    server = Transport.start(TransportConfig(local_only=True))
    client = Transport.start(TransportConfig(local_only=True, initial_peers=tuple(server.visible_maddrs())))

    def echo_reversed(peer: str, body: bytes) -> bytes:
        return body[::-1]

    def refuse(peer: str, body: bytes) -> bytes:
        raise CodecError("contribution rejected: bad signature")

    def crash(peer: str, body: bytes) -> bytes:
        raise RuntimeError("bug")

    server.add_handler("echo", echo_reversed, max_request_bytes=8 << 20)
    server.add_handler("refuse", refuse, max_request_bytes=1024)
    server.add_handler("crash", crash, max_request_bytes=1024)
    yield server, client
    client.shutdown()
    server.shutdown()


def test_request_round_trips_a_payload_larger_than_hiveminds_message_limit(pair):
    server, client = pair
    payload = os.urandom(5 << 20)  # > 4 MiB: unary hivemind calls would fail here
    assert client.request(server.peer_id, "echo", payload) == payload[::-1]
    assert client.request(server.peer_id, "echo", b"") == b""


def test_handler_errors_reach_the_caller_as_one_line(pair):
    server, client = pair
    with pytest.raises(TransportError, match="contribution rejected: bad signature"):
        client.request(server.peer_id, "refuse", b"x")
    with pytest.raises(TransportError, match="internal error"):
        client.request(server.peer_id, "crash", b"x")
    assert client.request(server.peer_id, "echo", b"ok") == b"ko"  # the peer still serves


def test_request_over_the_handlers_cap_is_refused_without_reading_it(pair):
    server, client = pair
    for size in (2000, 3 << 20):  # small, and large enough to be still in flight when refused
        with pytest.raises(TransportError, match="limit here is 1024 bytes"):
            client.request(server.peer_id, "refuse", b"x" * size)
    assert client.request(server.peer_id, "echo", b"ok") == b"ko"


def test_reply_over_the_callers_cap_is_refused(pair):
    server, client = pair
    with pytest.raises(TransportError, match="limit here is 100 bytes"):
        client.request(server.peer_id, "echo", b"y" * 1000, max_reply_bytes=100)


def test_unknown_handler_names_the_problem(pair):
    server, client = pair
    with pytest.raises(TransportError, match="does not serve 'missing'"):
        client.request(server.peer_id, "missing", b"")


def _raw_exchange(transport: Transport, peer_id: str, name: str, frame: bytes) -> tuple[int, int, bytes]:
    """Send hand-made bytes on a stream (a peer that is not this release) and read the reply frame."""
    from hivemind.p2p import PeerID

    async def go():
        _, reader, writer = await transport._p2p.call_binary_stream_handler(
            PeerID.from_base58(peer_id), HANDLER_PREFIX + name
        )
        writer.write(frame)
        await writer.drain()
        _, version, kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
        body = await reader.readexactly(length)
        await reader.readexactly(TRAILER_BYTES)
        writer.close()
        return version, kind, body

    return transport._run(go(), timeout=20)


def test_peer_with_another_protocol_version_gets_a_clear_error(pair):
    server, client = pair
    body = b"hello"
    frame = HEADER.pack(MAGIC, 99, KIND_REQUEST, len(body)) + body + hashlib.sha256(body).digest()
    _, kind, reply = _raw_exchange(client, server.peer_id, "echo", frame)
    assert kind != KIND_OK
    assert b"speaks Nord protocol v99, this node speaks v1" in reply


def test_corrupted_body_is_rejected(pair):
    server, client = pair
    body = b"hello"
    frame = HEADER.pack(MAGIC, 1, KIND_REQUEST, len(body)) + body + hashlib.sha256(b"other").digest()
    _, kind, reply = _raw_exchange(client, server.peer_id, "echo", frame)
    assert kind != KIND_OK and b"sha256 does not match" in reply


def test_caller_reports_a_reply_in_another_protocol_version(pair):
    server, client = pair

    async def future_peer(info, reader, writer):
        await reader.readexactly(HEADER.size + 2 + TRAILER_BYTES)
        writer.write(HEADER.pack(MAGIC, 7, KIND_OK, 0) + hashlib.sha256(b"").digest())
        await writer.drain()
        writer.close()

    server._run(server._p2p.add_binary_stream_handler(HANDLER_PREFIX + "future", future_peer))
    with pytest.raises(TransportError, match="speaks Nord protocol v7, this node speaks v1"):
        client.request(server.peer_id, "future", b"hi")


def test_a_request_that_times_out_is_cancelled_and_its_stream_closed(pair):
    server, client = pair
    hung_up = threading.Event()

    async def silent(info, reader, writer):
        while await reader.read(1 << 16):  # never answers; returns once the caller closes the stream
            pass
        hung_up.set()
        writer.close()

    server._run(server._p2p.add_binary_stream_handler(HANDLER_PREFIX + "silent", silent))
    with pytest.raises(TransportError, match="did not answer 'silent' within 1 s"):
        client.request(server.peer_id, "silent", b"x", timeout_s=1)
    assert hung_up.wait(timeout=30), "the timed-out request's stream was left open"


@pytest.fixture
def stalling_server(pair):
    """A peer whose `stall` handler blocks until released, capped at 3 streams per peer and 2 MiB of
    requests held."""
    _, client = pair
    server = Transport.start(
        TransportConfig(
            local_only=True,
            initial_peers=tuple(client.visible_maddrs()),
            max_streams_per_peer=3,
            max_inbound_bytes=2 << 20,
        )
    )
    release, entered = threading.Event(), []

    def stall(peer: str, body: bytes) -> bytes:
        entered.append(peer)
        release.wait(timeout=60)
        return b"done"

    server.add_handler("stall", stall, max_request_bytes=8 << 20)
    server.add_handler("echo", lambda peer, body: bytes(body), max_request_bytes=8 << 20)
    yield server, release, entered
    release.set()
    server.shutdown()


def test_a_flooding_peer_is_refused_over_its_cap_and_cannot_starve_other_peers(pair, stalling_server):
    server, release, entered = stalling_server
    _, flooder = pair
    outcomes: list[object] = []

    def call() -> None:
        try:
            outcomes.append(flooder.request(server.peer_id, "stall", b"x", timeout_s=120))
        except TransportError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        refused = lambda: [o for o in outcomes if "too many concurrent streams" in str(o)]  # noqa: E731
        wait_for(lambda: len(refused()) == 3, 60, "3 of 6 streams refused over the per-peer cap of 3")
        wait_for(lambda: len(entered) >= 2, 60, "the flooder's handler calls to start")
        with Transport.start(
            TransportConfig(local_only=True, initial_peers=tuple(server.visible_maddrs()))
        ) as other:
            assert other.request(server.peer_id, "echo", b"still served", timeout_s=30) == b"still served"
        assert len(entered) == 2, "one peer ran more than its 2 handler calls at once"
    finally:
        release.set()
        for t in threads:
            t.join(timeout=60)
    assert [bytes(o) for o in outcomes if not isinstance(o, TransportError)] == [b"done"] * 3
    assert server.inbound.refused == 3 and server.inbound.open == 0


def test_requests_over_the_inbound_byte_budget_are_refused_until_it_frees(pair, stalling_server):
    server, release, entered = stalling_server
    _, holder = pair
    big = os.urandom(3 << 19)  # 1.5 MiB: one such request held leaves less than its size of the 2 MiB
    held = threading.Thread(target=lambda: holder.request(server.peer_id, "stall", big, timeout_s=120))
    held.start()
    try:
        wait_for(lambda: entered, 60, "the first request to be held by its handler")
        assert server.inbound.held_bytes == len(big)
        with Transport.start(
            TransportConfig(local_only=True, initial_peers=tuple(server.visible_maddrs()))
        ) as other:
            with pytest.raises(TransportError, match="holding its limit of 2 MiB of incoming requests"):
                other.request(server.peer_id, "echo", big, timeout_s=60)
            assert other.request(server.peer_id, "echo", b"small", timeout_s=60) == b"small"
            release.set()
            held.join(timeout=60)
            assert other.request(server.peer_id, "echo", big, timeout_s=60) == big
    finally:
        release.set()
        held.join(timeout=60)
    assert server.inbound.held_bytes == 0


STALLED_PEER_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from nord.transport import Transport, TransportConfig
    t = Transport.start(TransportConfig(local_only=True, initial_peers=tuple(sys.argv[1:])))
    t.install_signal_handlers()
    def stall(peer, body):
        print("busy", flush=True)
        threading.Event().wait(3)  # still running when SIGTERM comes; the exit waits for it
        return body
    t.add_handler("stall", stall, max_request_bytes=1024)
    print(t.visible_maddrs()[0], flush=True)
    try:
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    """
)


def test_streams_ending_at_shutdown_are_not_logged_as_errors(caplog):
    """A stream that shutdown catches inside hivemind, before any handler runs, ends in an exception
    asyncio would log with a traceback; once shutdown began that is expected, not an error."""
    import asyncio

    transport = Transport.start(TransportConfig(local_only=True))
    context = {"message": "Unhandled exception in client_connected_cb", "exception": asyncio.CancelledError()}
    transport._on_loop_error(transport._loop, context)
    assert [r.levelname for r in caplog.records if r.name == "asyncio"] == ["ERROR"]  # while serving
    caplog.clear()
    transport.shutdown()
    for error in (asyncio.CancelledError(), asyncio.IncompleteReadError(b"", 10), ConnectionResetError()):
        transport._on_loop_error(transport._loop, {**context, "exception": error})
    assert [r for r in caplog.records if r.levelno >= 30] == []


def _error_of(transport: Transport, peer_id: str, name: str) -> Exception | None:
    try:
        transport.request(peer_id, name, b"x")
    except Exception as e:
        return e
    return None


@pytest.mark.slow
def test_sigterm_with_a_request_in_flight_logs_no_traceback(pair):
    """Python 3.11's stream server logs a CancelledError traceback for a handler task that ends cancelled,
    as shutdown used to leave the task serving an in-flight request."""
    _, client = pair
    proc = subprocess.Popen(
        [sys.executable, "-c", STALLED_PEER_SCRIPT, *client.visible_maddrs()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        from nord.transport import peer_id_of

        addr = proc.stdout.readline().strip()
        errors = []
        caller = threading.Thread(target=lambda: errors.append(_error_of(client, peer_id_of(addr), "stall")))
        caller.start()
        assert proc.stdout.readline().strip() == "busy"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        caller.join(timeout=60)
        assert out.strip() == "stopped" and proc.returncode == 0
        assert "Traceback" not in err and "CancelledError" not in err, err
        assert isinstance(errors[0], TransportError)
    finally:
        proc.kill()
        proc.wait()


def test_dht_records_are_shared_and_capped(pair):
    server, client = pair
    assert client.store_record("nord/test/contrib", "abc", {"round": 3, "size": 123, "holder": "p"}, ttl_s=60)
    assert client.store_record("nord/test/contrib", "def", {"round": 3, "size": 9, "holder": "q"}, ttl_s=60)
    records = server.get_records("nord/test/contrib")
    assert records == {
        "abc": {"round": 3, "size": 123, "holder": "p"},
        "def": {"round": 3, "size": 9, "holder": "q"},
    }
    assert server.get_records("nord/test/nothing") == {}
    with pytest.raises(TransportError, match="capped at 4096"):
        client.store_record("nord/test/big", "x", b"z" * 5000, ttl_s=60)


def test_identity_persists_and_cannot_be_used_twice(tmp_path):
    identity = str(tmp_path / "state" / "p2p.key")
    with Transport.start(TransportConfig(local_only=True, identity_path=identity)) as first:
        peer_id = first.peer_id
        with pytest.raises(TransportError, match="in use by another running node"):
            Transport.start(TransportConfig(local_only=True, identity_path=identity))
    with Transport.start(TransportConfig(local_only=True, identity_path=identity)) as again:
        assert again.peer_id == peer_id


def test_port_in_use_and_unreachable_bootstrap_are_explained():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TransportError, match="port already in use"):
            Transport.start(TransportConfig(local_only=True, host_maddrs=(f"/ip4/127.0.0.1/tcp/{port}",)))
        nobody = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmZqWdarUY7R8ntSuKJvTJGDmtzasj8YkP4Q39sZoZmXv8"
        with pytest.raises(TransportError, match="bootstrap unreachable"):
            Transport.start(TransportConfig(local_only=True, initial_peers=(nobody,)))


def test_config_rejects_an_initial_peer_without_peer_id():
    with pytest.raises(ConfigError, match="no /p2p/"):
        TransportConfig(initial_peers=("/ip4/127.0.0.1/tcp/1234",))
    with pytest.raises(ConfigError, match="not a multiaddr"):
        TransportConfig(host_maddrs=("localhost:80",))


PEER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from nord.transport import Transport, TransportConfig
    t = Transport.start(TransportConfig(local_only=True))
    t.install_signal_handlers()
    t.add_handler("echo", lambda peer, body: body, max_request_bytes=1024)
    try:
        print("ready", flush=True)
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        sys.exit(0)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_no_p2pd_or_socket_outlives_its_node(sig):
    proc = subprocess.Popen([sys.executable, "-c", PEER_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        daemons = children_p2pd(proc.pid)
        assert len(daemons) == 1
        sockets = [s for s in node_sockets(daemons) if s.exists()]  # the client one exists once it serves
        assert sockets and "p2pd-" in sockets[0].name
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
        assert wait_gone(daemons) == set()
        deadline = time.monotonic() + 10
        while any(s.exists() for s in sockets) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [s for s in sockets if s.exists()] == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_the_node_within_seconds():
    """`docker stop`, `nord demo` and a terminal's Ctrl-C signal the whole group, p2pd included; the node
    must not then wait on a daemon that is already gone (it used to hang 10 s in the DHT's shutdown)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER_SCRIPT.replace("sys.exit(0)", 'print("stopped", flush=True)')],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        daemons = children_p2pd(proc.pid)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.stdout.readline().strip() == "stopped"
        stopped_s = time.monotonic() - started
        assert proc.wait(timeout=30) == 0
        assert stopped_s < 5.0, f"the node took {stopped_s:.1f} s to shut down"
        assert wait_gone(daemons) == set()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
