"""Transport: a hivemind peer (p2pd + DHT node) behind a small blocking API; the only hivemind importer.

One `Transport` owns one p2pd daemon and one `DHTNode`, both driven by an asyncio loop in a background
thread ("async inside, blocking outside"). It offers three things:

1. Request/reply over libp2p binary streams, for payloads of any size (envelopes, run config, snapshots,
   tokenizer). Every message on a stream is one frame::

       magic b"NORD" | version u16 | kind u8 | 0 u8 | length u64 | sha256(body) 32 bytes | body

   written in 1 MiB pieces. The receiver checks magic, protocol version and the size cap before reading the
   body and the sha256 after; a frame from a peer with another `PROTOCOL_VERSION` is answered (or reported)
   as one clear error line. Replies are frames of kind OK (the handler's bytes) or ERROR (a UTF-8 line).

2. Small DHT records (`store_record` / `get_records`): contribution id, round, size, holder — never payloads
   (hivemind's DHT drops messages > 4 MiB silently and its store hangs above ~16 KiB; we cap values at 4 KiB).

3. Process hygiene: a persistent peer identity (`identity_path`, created atomically, locked against a second
   node using it), loopback-only options for tests (`local_only`: no UPnP/NAT-PMP/AutoNAT/relay), a
   watchdog that ends p2pd and removes its sockets if this process dies without `shutdown()` (even SIGKILL),
   and `install_signal_handlers()` so SIGINT/SIGTERM shut the peer down cleanly.

Public API (stable):
    PROTOCOL_VERSION, MAX_RECORD_BYTES
    TransportConfig(initial_peers, host_maddrs, announce_maddrs, client_mode, identity_path, local_only,
                    startup_timeout_s, request_timeout_s)
    Transport.start(config) -> Transport          (also a context manager; `shutdown()` is idempotent)
        .peer_id: str                             base58 libp2p peer id
        .visible_maddrs() -> list[str]            full multiaddrs (with /p2p/<id>) other peers can dial
        .add_handler(name, fn, max_request_bytes) fn(peer_id: str, body: bytes) -> bytes, run in a thread;
                                                  a NordError raised by fn goes back to the caller as its line
        .request(peer_id, name, body, timeout_s=None, max_reply_bytes=...) -> bytes   (TransportError)
        .store_record(key, subkey, value, ttl_s) -> bool    value: msgpack-able, <= MAX_RECORD_BYTES
        .get_records(key) -> dict[subkey, value]
        .connected_peers() -> list[str]
        .bytes_sent, .bytes_received: int         stream traffic so far (as caller and as server)
        .install_signal_handlers()                SIGINT/SIGTERM -> shutdown() then KeyboardInterrupt
        .stopped_by_signal: int | None            which signal stopped it, if one did
        .shutdown()
    TransportError (from nord.errors) for everything a user must fix, as one line.

Example:
    with Transport.start(TransportConfig(local_only=True)) as a, Transport.start(
        TransportConfig(initial_peers=tuple(a.visible_maddrs()), local_only=True)
    ) as b:
        a.add_handler("echo", lambda peer, body: body)
        assert b.request(a.peer_id, "echo", b"hi") == b"hi"
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import get_dht_time

from nord.errors import ConfigError, NordError, TransportError
from nord.fsutil import fsync_dir

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAGIC = b"NORD"
HEADER = struct.Struct(">4sHBxQ32s")  # magic, version, kind, pad, body length, sha256(body)
KIND_REQUEST, KIND_OK, KIND_ERROR = 1, 2, 3
CHUNK_BYTES = 1 << 20  # one stream write
MAX_RECORD_BYTES = 4096  # msgpack-encoded DHT value
MAX_ERROR_BYTES = 4096
DEFAULT_MAX_REPLY_BYTES = 1 << 30
HANDLER_PREFIX = "nord/"

T = TypeVar("T")
Handler = Callable[[str, bytes], bytes]


@dataclass(frozen=True, kw_only=True)
class TransportConfig:
    """How to start one peer."""

    initial_peers: tuple[
        str, ...
    ] = ()  # multiaddrs with /p2p/<peer id> of running peers; () starts a new swarm
    host_maddrs: tuple[
        str, ...
    ] = ()  # () -> 127.0.0.1 when local_only, else 0.0.0.0, both on a free tcp port
    announce_maddrs: tuple[str, ...] = ()  # public addresses to advertise (explicit ports), e.g. behind NAT
    client_mode: bool = False  # cannot accept inbound connections (Colab): serve no DHT, dial out only
    identity_path: str | None = None  # libp2p private key file; created if missing; None -> a fresh peer id
    local_only: bool = False  # tests: loopback only, no UPnP / NAT-PMP / AutoNAT / relays
    startup_timeout_s: float = 30.0
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for field_name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            for addr in getattr(self, field_name):
                try:
                    maddr = Multiaddr(addr)
                except Exception as e:  # multiaddr raises several unrelated types
                    raise ConfigError(f"{field_name}: {addr!r} is not a multiaddr ({e})") from None
                if field_name == "initial_peers" and "p2p" not in maddr:
                    raise ConfigError(
                        f"initial peer {addr!r} has no /p2p/<peer id> part; copy the full address the "
                        "bootstrap peer prints"
                    )
        if not (self.startup_timeout_s > 0 and self.request_timeout_s > 0):
            raise ConfigError("transport timeouts must be > 0")

    def resolved_host_maddrs(self) -> tuple[str, ...]:
        if self.host_maddrs:
            return self.host_maddrs
        return ("/ip4/127.0.0.1/tcp/0",) if self.local_only else ("/ip4/0.0.0.0/tcp/0",)


class Transport:
    """A running peer. Create with `Transport.start(config)`; every method blocks and is thread-safe."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.peer_id = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nord-transport", daemon=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="nord-handler"
        )
        self._p2p: P2P | None = None
        self._dht: DHTNode | None = None
        self._watchdog: subprocess.Popen | None = None
        self._lock_file: Any = None
        self._closed = False
        self._close_lock = threading.Lock()
        self.stopped_by_signal: int | None = None  # set by the handlers of install_signal_handlers
        self.bytes_sent = 0  # frame bytes written and read on streams, both as caller and as server
        self.bytes_received = 0

    # ---- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: TransportConfig) -> Transport:
        """Start p2pd and the DHT node; raise TransportError with the fix when that fails."""
        self = cls(config)
        self._thread.start()
        try:
            if config.identity_path is not None:
                self._lock_file = _lock_identity(Path(config.identity_path))
            self._run(self._start(), timeout=config.startup_timeout_s * 2 + 30)
        except BaseException:
            self.shutdown()
            raise
        logger.info("peer %s listening on %s", self.peer_id, ", ".join(self.visible_maddrs()))
        return self

    async def _start(self) -> None:
        cfg = self.config
        kwargs: dict[str, Any] = dict(
            initial_peers=list(cfg.initial_peers) or None,
            host_maddrs=list(cfg.resolved_host_maddrs()),
            announce_maddrs=list(cfg.announce_maddrs) or None,
            dht_mode="client" if cfg.client_mode else "server",
            startup_timeout=cfg.startup_timeout_s,
            auto_nat=not cfg.local_only,
            nat_port_map=not cfg.local_only,
            use_relay=not cfg.local_only,
            use_auto_relay=cfg.client_mode and not cfg.local_only,
        )
        if cfg.identity_path is not None:
            kwargs["identity_path"] = str(_ensure_identity(Path(cfg.identity_path)))
        try:
            self._p2p = await P2P.create(**kwargs)
        except P2PDaemonError as e:
            raise TransportError(_explain_daemon_error(str(e), cfg)) from None
        self._watchdog = _start_watchdog(self._p2p)
        self.peer_id = self._p2p.peer_id.to_base58()
        try:
            self._dht = await DHTNode.create(
                p2p=self._p2p,
                initial_peers=list(cfg.initial_peers) or None,
                client_mode=cfg.client_mode,
                wait_timeout=5.0,
                bootstrap_timeout=10.0,
            )
        except RuntimeError as e:
            if "bootstrap failed" in str(e):
                raise TransportError(_bootstrap_unreachable(cfg)) from None
            raise

    def shutdown(self) -> None:
        """Stop the DHT node and p2pd, remove their sockets, release the identity. Safe to call twice."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._shutdown(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if self._watchdog is not None:
            _stand_down(self._watchdog)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._lock_file is not None:
            self._lock_file.close()
        logger.info("peer %s shut down", self.peer_id or "(not started)")

    async def _shutdown(self) -> None:
        if self._dht is not None:
            with contextlib.suppress(Exception):
                await self._dht.shutdown()
        if self._p2p is not None:
            await self._p2p.shutdown()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def install_signal_handlers(self) -> None:
        """On SIGINT/SIGTERM: shut the peer down, then raise KeyboardInterrupt in the main thread."""

        def on_signal(signum: int, frame: object) -> None:
            logger.info("received %s, shutting down", signal.Signals(signum).name)
            self.stopped_by_signal = signum
            self.shutdown()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    # ---- identity and addresses ------------------------------------------------------------------------

    def visible_maddrs(self) -> list[str]:
        """Addresses other peers can use as `initial_peers` (each ends in /p2p/<peer id>)."""
        return [str(m) for m in self._run(self._p2p.get_visible_maddrs())]

    def connected_peers(self) -> list[str]:
        return [info.peer_id.to_base58() for info in self._run(self._p2p.list_peers())]

    # ---- request / reply over binary streams ------------------------------------------------------------

    def add_handler(self, name: str, fn: Handler, *, max_request_bytes: int) -> None:
        """Serve `name`: `fn(peer_id, body) -> reply bytes`, called in a worker thread.

        A `NordError` from `fn` is sent back as an ERROR frame with its message; other exceptions are logged
        here and reported to the caller as an internal error.
        """
        self._run(
            self._p2p.add_binary_stream_handler(
                HANDLER_PREFIX + name, self._make_stream_handler(fn, max_request_bytes)
            )
        )

    def request(
        self,
        peer_id: str,
        name: str,
        body: bytes,
        *,
        timeout_s: float | None = None,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> bytes:
        """Send `body` to `peer_id`'s handler `name`; return its verified reply or raise TransportError."""
        timeout = timeout_s or self.config.request_timeout_s
        digest = hashlib.sha256(body).digest()  # hashed in the caller's thread, not on the loop
        try:
            return self._run(self._request(peer_id, name, body, digest, max_reply_bytes), timeout=timeout)
        except (concurrent.futures.TimeoutError, asyncio.TimeoutError):
            raise TransportError(
                f"peer {_short(peer_id)} did not answer {name!r} within {timeout:.0f} s"
            ) from None

    async def _request(
        self, peer_id: str, name: str, body: bytes, digest: bytes, max_reply_bytes: int
    ) -> bytes:
        try:
            target = PeerID.from_base58(peer_id)
        except Exception:
            raise TransportError(f"{peer_id!r} is not a peer id") from None
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(target, HANDLER_PREFIX + name)
        except P2PDaemonError as e:
            if "protocols not supported" in str(e):
                raise TransportError(
                    f"peer {_short(peer_id)} does not serve {name!r}: "
                    "not a Nord peer, or an incompatible release"
                ) from None
            raise TransportError(
                f"peer {_short(peer_id)} unreachable for {name!r}: {_first_line(e)}"
            ) from None
        try:
            await _write_frame(writer, KIND_REQUEST, body, digest)
            self.bytes_sent += HEADER.size + len(body)
            kind, reply = await _read_frame(reader, max_reply_bytes, who=f"peer {_short(peer_id)}")
            self.bytes_received += HEADER.size + len(reply)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            raise TransportError(
                f"peer {_short(peer_id)} closed the stream for {name!r} ({type(e).__name__})"
            ) from None
        finally:
            writer.close()
        if kind == KIND_ERROR:
            raise TransportError(f"peer {_short(peer_id)}: {reply.decode('utf-8', 'replace')}")
        if kind != KIND_OK:
            raise TransportError(f"peer {_short(peer_id)} sent a frame of unknown kind {kind}")
        return reply

    def _make_stream_handler(self, fn: Handler, max_request_bytes: int) -> Callable[..., Coroutine]:
        async def handle(
            stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            peer = stream_info.peer_id.to_base58()
            try:
                try:
                    _, body = await _read_frame(reader, max_request_bytes, who=f"peer {_short(peer)}")
                    self.bytes_received += HEADER.size + len(body)
                except TransportError as e:
                    logger.info("rejected a request from %s: %s", _short(peer), e)
                    await _write_error(writer, str(e))
                    return
                try:
                    reply, digest = await self._loop.run_in_executor(
                        self._executor, _call_handler, fn, peer, body
                    )
                except NordError as e:
                    await _write_error(writer, str(e))
                    return
                except Exception:
                    logger.exception(
                        "handler %s failed on a request from %s", stream_info.proto, _short(peer)
                    )
                    await _write_error(writer, "internal error in the peer's handler (see its log)")
                    return
                await _write_frame(writer, KIND_OK, reply, digest)
                self.bytes_sent += HEADER.size + len(reply)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                logger.debug("stream from %s ended early: %s", _short(peer), e)
            finally:
                writer.close()

        return handle

    # ---- DHT records -------------------------------------------------------------------------------------

    def store_record(self, key: str, subkey: str, value: Any, ttl_s: float) -> bool:
        """Store a small msgpack-able `value` under (key, subkey) for `ttl_s` s; True if any peer took it."""
        size = len(msgpack.packb(value, use_bin_type=True))
        if size > MAX_RECORD_BYTES:
            raise TransportError(
                f"DHT record {key}/{subkey} is {size} bytes; records are capped at {MAX_RECORD_BYTES}"
            )
        return bool(self._run(self._dht.store(key, value, get_dht_time() + ttl_s, subkey=subkey)))

    def get_records(self, key: str) -> dict[str, Any]:
        """Every live (subkey -> value) under `key`, newest known values; {} if none."""
        found = self._run(self._dht.get(key, latest=True))
        if found is None or not isinstance(found.value, dict):
            return {}
        return {str(subkey): item.value for subkey, item in found.value.items()}

    # ---- plumbing ----------------------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed and not coro.__qualname__.endswith("_shutdown"):
            coro.close()
            raise TransportError("the transport is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


def _call_handler(fn: Handler, peer: str, body: bytes) -> tuple[bytes, bytes]:
    reply = bytes(fn(peer, body))
    return reply, hashlib.sha256(reply).digest()


async def _write_frame(writer: asyncio.StreamWriter, kind: int, body: bytes, digest: bytes) -> None:
    writer.write(HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(body), digest))
    view = memoryview(body)
    for start in range(0, len(view), CHUNK_BYTES):
        writer.write(view[start : start + CHUNK_BYTES])
        await writer.drain()
    await writer.drain()


async def _write_error(writer: asyncio.StreamWriter, message: str) -> None:
    data = message.encode("utf-8")[:MAX_ERROR_BYTES]
    with contextlib.suppress(ConnectionError):
        await _write_frame(writer, KIND_ERROR, data, hashlib.sha256(data).digest())


async def _read_frame(reader: asyncio.StreamReader, max_bytes: int, *, who: str) -> tuple[int, bytes]:
    """Read one frame; check magic, version, size cap and sha256 before returning (kind, body)."""
    magic, version, kind, length, digest = HEADER.unpack(await reader.readexactly(HEADER.size))
    if magic != MAGIC:
        raise TransportError(f"{who} does not speak the Nord protocol (bad magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise TransportError(
            f"{who} speaks Nord protocol v{version}, this node speaks v{PROTOCOL_VERSION}: "
            "run the same Nord release as the run's coordinator (pip install -U nord)"
        )
    cap = max_bytes if kind != KIND_ERROR else MAX_ERROR_BYTES
    if length > cap:
        raise TransportError(f"{who} sent a {length}-byte message; the limit here is {cap} bytes")
    hasher = hashlib.sha256()
    chunks = []
    remaining = length
    while remaining:
        chunk = await reader.readexactly(min(CHUNK_BYTES, remaining))
        hasher.update(chunk)
        chunks.append(chunk)
        remaining -= len(chunk)
    if hasher.digest() != digest:
        raise TransportError(f"{who} sent a message whose sha256 does not match its header (corrupted)")
    return kind, b"".join(chunks)


# ---- process hygiene -------------------------------------------------------------------------------------


def _ensure_identity(path: Path) -> Path:
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


def _lock_identity(identity: Path) -> Any:
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


def _start_watchdog(p2p: P2P) -> subprocess.Popen | None:
    child = getattr(p2p, "_child", None)
    if child is None:
        return None
    sockets = [str(m["unix"]) for m in (p2p._daemon_listen_maddr, p2p._client_listen_maddr)]
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(child.pid), *sockets],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C must not reach it
    )


def _stand_down(watchdog: subprocess.Popen) -> None:
    with contextlib.suppress(OSError, ValueError):
        watchdog.stdin.write(b"x")
        watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(timeout=5)


def _explain_daemon_error(message: str, cfg: TransportConfig) -> str:
    low = message.lower()
    if "address already in use" in low:
        return (
            f"p2pd could not listen on {', '.join(cfg.resolved_host_maddrs())}: port already in use; "
            "pick a free port in --host-maddrs (or tcp/0 for any)"
        )
    if "failed to connect to bootstrap peers" in low:
        return _bootstrap_unreachable(cfg)
    if "already taken" in low:
        return (
            f"identity {cfg.identity_path} is already used by another peer of this swarm; "
            "stop that node or use another --state-dir"
        )
    if "failed to start in" in low:
        return (
            f"p2pd did not start within {cfg.startup_timeout_s:.0f} s (overloaded?): {_first_line(message)}"
        )
    return f"p2pd failed to start: {_first_line(message)}"


def _bootstrap_unreachable(cfg: TransportConfig) -> str:
    return (
        f"bootstrap unreachable: none of {', '.join(cfg.initial_peers)} answered; "
        "check that it is running and that the address is current "
        "(it changes when that peer restarts without a fixed port)"
    )


def _first_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _short(peer_id: str) -> str:
    return peer_id[-8:] if len(peer_id) > 8 else peer_id
