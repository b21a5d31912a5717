"""nord.transport.frames without peers: a frame survives the trip; every bad frame is named in one line;
a claimed length costs nothing until bytes arrive; stalled and dripping peers are cut."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import tracemalloc

import pytest

from nord.errors import TransportError
from nord.transport.frames import (
    CHUNK_BYTES,
    HEADER,
    KIND_ERROR,
    KIND_OK,
    MAGIC,
    PROTOCOL_VERSION,
    read_frame,
    write_error,
    write_frame,
)


class Pipe:
    """A real asyncio StreamWriter whose bytes land in a StreamReader (in memory, no sockets)."""

    def __init__(self) -> None:
        self.reader = asyncio.StreamReader(limit=1 << 16)
        outer = self

        class Transport(asyncio.Transport):
            def write(self, data) -> None:
                outer.reader.feed_data(bytes(data))

            def is_closing(self) -> bool:
                return False

        protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader())
        self.writer = asyncio.StreamWriter(Transport(), protocol, None, asyncio.get_running_loop())


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, 3 * CHUNK_BYTES + 17], ids=lambda n: f"n{n}")
def test_frame_round_trips(size):
    body = os.urandom(size)

    async def go():
        pipe = Pipe()
        await write_frame(pipe.writer, KIND_OK, body)
        return await read_frame(pipe.reader, size, who="peer x")

    kind, got = run(go())
    assert kind == KIND_OK and bytes(got) == body


def _frame(
    body: bytes, *, magic=MAGIC, version=PROTOCOL_VERSION, kind=KIND_OK, length=None, digest=None
) -> bytes:
    length = len(body) if length is None else length
    digest = hashlib.sha256(body).digest() if digest is None else digest
    return HEADER.pack(magic, version, kind, length) + body + digest


def _read(data: bytes, max_bytes: int = 1 << 20):
    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_frame(reader, max_bytes, who="peer x")

    return run(go())


@pytest.mark.parametrize(
    "frame, message",
    [
        (_frame(b"hi", magic=b"HTTP"), "does not speak the Nord protocol"),
        (_frame(b"hi", version=PROTOCOL_VERSION + 1), f"speaks Nord protocol v{PROTOCOL_VERSION + 1}"),
        (_frame(b"hi", digest=bytes(32)), "sha256 does not match"),
        (_frame(b"x" * 10, length=2**40), "limit here is"),  # refused from the header, before any body
    ],
    ids=["magic", "version", "corrupt", "oversize"],
)
def test_bad_frames_are_refused_with_one_line(frame, message):
    with pytest.raises(TransportError, match=message):
        _read(frame)


def test_truncated_frame_is_an_incomplete_read():
    with pytest.raises(asyncio.IncompleteReadError):
        _read(_frame(b"hello")[:-5])


def test_error_frames_are_capped_small():
    async def go():
        pipe = Pipe()
        await write_error(pipe.writer, "no such run " + "x" * 10_000)
        return await read_frame(pipe.reader, 10, who="peer x")

    kind, body = run(go())
    assert kind == KIND_ERROR and body.startswith(b"no such run") and len(body) == 4096


def test_a_claimed_length_allocates_nothing_until_the_bytes_arrive():
    """A header claiming 64 MiB followed by a few bytes: the reader holds what arrived, not the claim."""
    claimed = 64 << 20

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(HEADER.pack(MAGIC, PROTOCOL_VERSION, KIND_OK, claimed) + b"x" * 1000)
        tracemalloc.start()
        try:
            task = asyncio.ensure_future(read_frame(reader, claimed, who="peer x"))
            for _ in range(20):  # let it read the header and wait for the body
                await asyncio.sleep(0)
            assert not task.done()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        task.cancel()
        return peak

    assert run(go()) < 2 * CHUNK_BYTES


def test_a_body_larger_than_one_chunk_grows_to_its_length():
    body = os.urandom(2 * CHUNK_BYTES + 5)
    kind, got = _read(_frame(body), max_bytes=len(body))
    assert kind == KIND_OK and got == body


def _read_fed(feed, idle_timeout_s: float):
    """read_frame on a stream that `feed(reader)` (a coroutine) fills while it is being read."""

    async def go():
        reader = asyncio.StreamReader()
        feeding = asyncio.ensure_future(feed(reader))
        try:
            return await read_frame(reader, 1 << 20, who="peer x", idle_timeout_s=idle_timeout_s)
        finally:
            feeding.cancel()

    return run(go())


def test_a_peer_that_stalls_mid_body_is_cut_by_the_idle_timeout():
    async def stall(reader):
        reader.feed_data(_frame(b"y" * 5000)[:1000])

    with pytest.raises(TransportError, match="stalled after 0 of 5000 bytes for 0.2 s; stream cut"):
        _read_fed(stall, idle_timeout_s=0.2)


def test_a_peer_that_drips_is_cut_by_the_idle_timeout():
    """One byte every 50 ms never completes a 16-byte header within 300 ms, however slow the machine."""

    async def drip(reader):
        for byte in _frame(b"z" * 100):
            reader.feed_data(bytes([byte]))
            await asyncio.sleep(0.05)

    with pytest.raises(TransportError, match="sent no message for 0.3 s; stream cut"):
        _read_fed(drip, idle_timeout_s=0.3)


def test_a_peer_that_stops_reading_is_cut_by_the_idle_timeout():
    async def go():
        mine, theirs = socket.socketpair()
        with mine, theirs:  # `theirs` is never read: the socket buffers fill and drain() waits
            _, writer = await asyncio.open_connection(sock=mine)
            try:
                await write_frame(writer, KIND_OK, bytes(16 << 20), idle_timeout_s=0.3, who="peer x")
            finally:
                writer.transport.abort()

    with pytest.raises(TransportError, match="peer x stopped reading for 0.3 s; stream cut"):
        run(go())
