"""`Transport`: one hivemind peer (p2pd + DHT node) driven by an asyncio loop in a background thread,
behind blocking, thread-safe methods. See the package docstring for the API.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.timed_storage import get_dht_time

from nord.errors import NordError, TransportError
from nord.transport import daemon
from nord.transport.config import TransportConfig
from nord.transport.frames import (
    KIND_ERROR,
    KIND_OK,
    KIND_REQUEST,
    OVERHEAD_BYTES,
    read_frame,
    write_error,
    write_frame,
)
from nord.transport.inbound import Inbound, discard_until_closed

logger = logging.getLogger("nord.transport")

MAX_RECORD_BYTES = 4096  # msgpack-encoded DHT value
DEFAULT_MAX_REPLY_BYTES = 1 << 30
# Shutdown steps are bounded: nothing durable depends on them (a peer's state lives in its own files).
P2PD_EXIT_TIMEOUT_S = 3.0
TASK_CANCEL_TIMEOUT_S = 1.0
HANDLER_PREFIX = "nord/"
# Handlers run in HANDLER_THREADS threads, at most HANDLER_CALLS_PER_PEER of them for one peer at a time
# (its other streams wait without a thread): a slow or flooding peer cannot starve the others.
HANDLER_THREADS = 16
HANDLER_CALLS_PER_PEER = 2

T = TypeVar("T")
Handler = Callable[[str, bytes], bytes]


NETWORK_ID_PREFIXES = ("12D3KooW", "Qm")  # the same in every libp2p id of one key type: no information


def network_peer(peer_id: str) -> str:
    """How errors and logs name a peer known only by its libp2p network id: labelled as such, and by the
    8 characters after the common prefix (`network peer ZqWdarUY…`), so it is never taken for a signing
    key's fingerprint, the id the dashboard shows (docs/volunteer.md, "Your id and your name")."""
    prefix = next((p for p in NETWORK_ID_PREFIXES if peer_id.startswith(p)), "")
    return f"network peer {peer_id[len(prefix) : len(prefix) + 8]}…"


class Transport:
    """A running peer. Create with `Transport.start(config)`; every method blocks and is thread-safe."""

    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.peer_id = ""
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        self._thread = threading.Thread(target=self._loop.run_forever, name="nord-transport", daemon=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=HANDLER_THREADS, thread_name_prefix="nord-handler"
        )
        self.inbound = Inbound(
            per_peer=config.max_streams_per_peer,
            total=config.max_streams,
            calls_per_peer=HANDLER_CALLS_PER_PEER,
            max_bytes=config.max_inbound_bytes,
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
        daemon.use_nord_logging()
        self = cls(config)
        self._thread.start()
        try:
            if config.identity_path is not None:
                self._lock_file = daemon.lock_identity(Path(config.identity_path))
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
            kwargs["identity_path"] = str(daemon.ensure_identity(Path(cfg.identity_path)))
        try:
            self._p2p = await P2P.create(**kwargs)
        except P2PDaemonError as e:
            raise TransportError(daemon.explain_daemon_error(str(e), cfg)) from None
        self._watchdog = daemon.start_watchdog(self._p2p)
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
                raise TransportError(daemon.bootstrap_unreachable(cfg)) from None
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
            daemon.stand_down(self._watchdog)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._lock_file is not None:
            self._lock_file.close()
        logger.info("peer %s shut down", self.peer_id or "(not started)")

    async def _shutdown(self) -> None:
        # Not DHTNode.shutdown(): all it does is unregister its handlers from p2pd, which is ended next
        # anyway, and it never returns if p2pd is already gone (a SIGTERM to the process group reaches
        # p2pd too), which held every stop for the full outer timeout.
        if self._dht is not None:
            self._dht.is_alive = False
        child = getattr(self._p2p, "_child", None)
        if self._p2p is not None:
            try:
                await asyncio.wait_for(self._p2p.shutdown(), P2PD_EXIT_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("p2pd did not exit within %.0f s of SIGTERM; killing it", P2PD_EXIT_TIMEOUT_S)
                if child is not None:
                    with contextlib.suppress(ProcessLookupError):
                        child.kill()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=TASK_CANCEL_TIMEOUT_S)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Once shutdown began, streams ending (cancelled, cut off by p2pd's exit) are expected: DEBUG.

        hivemind reads each inbound stream's header before calling a handler; a stream caught there by
        shutdown would otherwise be logged by asyncio with a traceback.
        """
        error = context.get("exception")
        expected = (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError)
        if self._closed and isinstance(error, expected):
            logger.debug("after shutdown: %s (%r)", context.get("message"), error)
            return
        loop.default_exception_handler(context)

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
        """Send `body` to `peer_id`'s handler `name`; return its verified reply or raise TransportError.

        A request that takes longer than `timeout_s` (default: the config's `request_timeout_s`) is
        cancelled: its stream is closed and its task ends.
        """
        timeout = timeout_s or self.config.request_timeout_s
        try:
            return self._run(self._request(peer_id, name, body, max_reply_bytes), timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TransportError(
                f"{network_peer(peer_id)} did not answer {name!r} within {timeout:.0f} s"
            ) from None

    async def _request(self, peer_id: str, name: str, body: bytes, max_reply_bytes: int) -> bytes:
        try:
            target = PeerID.from_base58(peer_id)
        except Exception:
            raise TransportError(f"{peer_id!r} is not a peer id") from None
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(target, HANDLER_PREFIX + name)
        except P2PDaemonError as e:
            if "protocols not supported" in str(e):
                raise TransportError(
                    f"{network_peer(peer_id)} does not serve {name!r}: "
                    "not a Nord peer, or an incompatible release"
                ) from None
            raise TransportError(
                f"{network_peer(peer_id)} unreachable for {name!r}: {daemon.first_line(e)}"
            ) from None
        who, idle = network_peer(peer_id), self.config.idle_timeout_s
        try:
            try:
                await write_frame(writer, KIND_REQUEST, body, idle_timeout_s=idle, who=who)
                self.bytes_sent += OVERHEAD_BYTES + len(body)
            except (ConnectionError, TransportError):
                pass  # the peer refused early (too big, too many streams); its reason may wait in `reader`
            # the header may take as long as the peer works on it (bounded by the request's timeout)
            kind, reply = await read_frame(
                reader, max_reply_bytes, who=who, idle_timeout_s=idle, header_timeout_s=None
            )
            self.bytes_received += OVERHEAD_BYTES + len(reply)
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            raise TransportError(
                f"{network_peer(peer_id)} closed the stream for {name!r} ({type(e).__name__})"
            ) from None
        finally:
            writer.close()
        if kind == KIND_ERROR:
            raise TransportError(f"{network_peer(peer_id)}: {reply.decode('utf-8', 'replace')}")
        if kind != KIND_OK:
            raise TransportError(f"{network_peer(peer_id)} sent a frame of unknown kind {kind}")
        return reply

    def _make_stream_handler(self, fn: Handler, max_request_bytes: int) -> Callable[..., Coroutine]:
        async def handle(
            stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            peer = stream_info.peer_id.to_base58()
            try:
                refusal = self.inbound.admit(peer, network_peer(peer))
                if refusal is not None:
                    await write_error(writer, refusal, idle_timeout_s=self.config.idle_timeout_s)
                    await discard_until_closed(reader)
                    return
                held = self.inbound.request_bytes()  # counted from arrival until the handler returns
                try:
                    await self._serve(
                        fn, max_request_bytes, peer, stream_info.proto, reader, writer, held.reserve
                    )
                finally:
                    held.release()
                    self.inbound.release(peer)
            except asyncio.CancelledError:
                # Shutdown cancels every task. Ending this one quietly matters: Python 3.11's stream
                # server calls task.exception() on it, which logs a CancelledError traceback.
                pass
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                logger.debug("stream from %s ended early: %s", network_peer(peer), e)
            finally:
                writer.close()

        return handle

    async def _serve(
        self,
        fn: Handler,
        max_request_bytes: int,
        peer: str,
        proto: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reserve: Callable[[int], None],
    ) -> None:
        """Read one request (idle timeout per read, each chunk counted by `reserve`), run `fn` in a
        handler thread, write its reply."""
        who, idle = network_peer(peer), self.config.idle_timeout_s
        try:
            _, body = await read_frame(
                reader, max_request_bytes, who=who, idle_timeout_s=idle, reserve=reserve
            )
            self.bytes_received += OVERHEAD_BYTES + len(body)
        except TransportError as e:
            logger.info("rejected a request from %s: %s", network_peer(peer), e)
            await write_error(writer, str(e), idle_timeout_s=idle)
            await discard_until_closed(reader)
            return
        try:
            async with self.inbound.calls(peer):
                reply = await self._loop.run_in_executor(self._executor, fn, peer, body)
        except NordError as e:
            await write_error(writer, str(e), idle_timeout_s=idle)
            return
        except Exception:
            logger.exception("handler %s failed on a request from %s", proto, network_peer(peer))
            await write_error(
                writer, "internal error in the peer's handler (see its log)", idle_timeout_s=idle
            )
            return
        try:
            await write_frame(writer, KIND_OK, reply, idle_timeout_s=idle, who=who)
        except TransportError as e:
            logger.info("reply to %s not delivered: %s", network_peer(peer), e)
            return
        self.bytes_sent += OVERHEAD_BYTES + len(reply)

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
        """Run `coro` on the loop; on `timeout` cancel it (its streams close) and raise TimeoutError."""
        if self._closed and not coro.__qualname__.endswith("_shutdown"):
            coro.close()
            raise TransportError("the transport is shut down")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise
        except concurrent.futures.CancelledError:
            raise TransportError("the transport shut down while this call was in flight") from None
