"""A victim and two hostile peers for tests/security/test_stream_attacks.py, each a process built from
Nord's own library (nord.transport, nord.gossip) on 127.0.0.1.

    python streams_peer.py victim IDLE_S            a peer serving the gossip handlers over a test replica,
                                                    with an idle timeout of IDLE_S; prints its address
    python streams_peer.py flood ADDR N             opens N streams to ADDR's `push` whose headers claim
                                                    the handler's whole cap (97 MiB) and sends nothing
                                                    more; prints "holding" once ADDR has answered (or
                                                    refused) a hello behind them, then one JSON line:
                                                    what each stream got
    python streams_peer.py drip ADDR INTERVAL_S     one `push` stream that sends a byte every INTERVAL_S;
                                                    prints one JSON line: the reply and when it came

Hostile peers write raw frames (a release of Nord would not), through the transport's own p2pd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from nord.errors import TransportError
from nord.gossip import Gossip, hello
from nord.gossip.wire import MAX_DELTA_BYTES
from nord.transport import HANDLER_PREFIX, Transport, TransportConfig, peer_id_of
from nord.transport.frames import HEADER, KIND_REQUEST, MAGIC, MAX_ERROR_BYTES, PROTOCOL_VERSION, read_frame


def victim(idle_s: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nord"))
    from crdt_support import make_replica  # the test replica of tests/nord

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bench/stream_attacks.py --ref runs this victim on older trees too, which have no idle timeout
    has_idle = "idle_timeout_s" in TransportConfig.__dataclass_fields__
    transport = Transport.start(
        TransportConfig(local_only=True, **({"idle_timeout_s": idle_s} if has_idle else {}))
    )
    transport.install_signal_handlers()
    gossip = Gossip(transport, make_replica(), '{"run_id": "crdt-test"}', role="coordinator")
    gossip.serve()
    print(transport.visible_maddrs()[0], flush=True)
    try:
        while True:
            time.sleep(0.2)
    except KeyboardInterrupt:
        gossip.close()
        print("stopped", flush=True)


async def _open_push(transport: Transport, peer_id: str):
    from hivemind.p2p import PeerID

    _, reader, writer = await transport._p2p.call_binary_stream_handler(
        PeerID.from_base58(peer_id), HANDLER_PREFIX + "push"
    )
    return reader, writer


async def _reply(reader: asyncio.StreamReader) -> str:
    """The error line the victim sent on this stream, or how the stream ended."""
    try:
        _, body = await read_frame(reader, MAX_ERROR_BYTES, who="victim")
        return body.decode("utf-8", "replace")
    except (TransportError, ConnectionError, asyncio.IncompleteReadError) as e:
        return f"stream ended: {type(e).__name__}"


def flood(addr: str, count: int) -> None:
    peer = peer_id_of(addr)
    with Transport.start(TransportConfig(local_only=True, initial_peers=(addr,))) as transport:
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, KIND_REQUEST, MAX_DELTA_BYTES)

        async def open_all():
            streams = []
            for _ in range(count):
                reader, writer = await _open_push(transport, peer)
                streams.append((reader, writer))
                writer.write(header)
                with contextlib.suppress(ConnectionError):  # a refused stream may be closed already
                    await writer.drain()
            return streams

        streams = transport._run(open_all(), timeout=60)
        try:  # a round trip behind the headers: the victim has taken them when it answers
            hello(transport, peer, "crdt-test")
        except TransportError as e:  # refused over this peer's stream cap: an answer too
            print(f"hello: {e}", file=sys.stderr)
        print("holding", flush=True)

        async def replies():
            got = await asyncio.gather(*(_reply(reader) for reader, _ in streams))
            for _, writer in streams:
                writer.close()
            return got

        print(json.dumps({"replies": transport._run(replies(), timeout=600)}), flush=True)


def drip(addr: str, interval_s: float) -> None:
    peer = peer_id_of(addr)
    with Transport.start(TransportConfig(local_only=True, initial_peers=(addr,))) as transport:
        frame = HEADER.pack(MAGIC, PROTOCOL_VERSION, KIND_REQUEST, 1000) + bytes(1000)

        async def go():
            reader, writer = await _open_push(transport, peer)
            started = time.monotonic()
            reply = asyncio.ensure_future(_reply(reader))
            for byte in frame:
                if reply.done():
                    break
                writer.write(bytes([byte]))
                with contextlib.suppress(ConnectionError):  # cut: the reply says why
                    await writer.drain()
                await asyncio.wait([reply], timeout=interval_s)
            message = await reply
            writer.close()
            return {"reply": message, "after_s": time.monotonic() - started}

        print(json.dumps(transport._run(go(), timeout=600)), flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "victim":
        victim(float(args[0]))
    elif mode == "flood":
        flood(args[0], int(args[1]))
    elif mode == "drip":
        drip(args[0], float(args[1]))
    else:
        sys.exit(f"unknown mode {mode!r}")
