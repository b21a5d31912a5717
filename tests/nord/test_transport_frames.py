"""nord.transport.frames without peers: a frame survives the trip; every bad frame is named in one line."""

from __future__ import annotations

import asyncio
import hashlib
import os

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
