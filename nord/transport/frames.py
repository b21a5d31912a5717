"""The frame every message on a Nord stream is, and its checked reading and writing.

    header   magic b"NORD" | protocol version u16 | kind u8 | 0 u8 | body length u64     (16 bytes)
    body     `length` bytes, written in 1 MiB pieces
    trailer  sha256(body)                                                                 (32 bytes)

The receiver checks magic, version and the size cap from the header before reading any body, and the
sha256 before returning the body: nothing unverified reaches a handler. The hash travels after the body
so both ends hash while the bytes move (hashing 100 MB takes about as long as sending it on loopback).
Magic and version come first in every frame of every version, so a peer of another release is told so.

The length in a header is only a claim: the body buffer grows as bytes really arrive (one CHUNK_BYTES
read at a time), so a header that claims 97 MiB and is followed by nothing costs nothing. Each read
(the header, one chunk, the trailer) and each write's drain must finish within `idle_timeout_s`: a peer
that stalls or drips (less than CHUNK_BYTES per idle timeout, 35 KB/s at 30 s) is cut with one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nord.errors import TransportError

PROTOCOL_VERSION = 1
MAGIC = b"NORD"
HEADER = struct.Struct(">4sHBxQ")  # magic, version, kind, pad, body length
TRAILER_BYTES = 32  # sha256(body)
KIND_REQUEST, KIND_OK, KIND_ERROR = 1, 2, 3
CHUNK_BYTES = 1 << 20  # one stream write
MAX_ERROR_BYTES = 4096
OVERHEAD_BYTES = HEADER.size + TRAILER_BYTES
_INLINE_HASH_BYTES = 1 << 16  # smaller pieces are hashed on the loop; larger ones in a thread, overlapped

T = TypeVar("T")


async def write_frame(
    writer: asyncio.StreamWriter,
    kind: int,
    body: bytes | bytearray,
    *,
    idle_timeout_s: float | None = None,
    who: str = "the peer",
) -> None:
    """Write one frame; TransportError if `who` stops reading for `idle_timeout_s` (None: no limit)."""
    writer.write(HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(body)))
    hasher = hashlib.sha256()
    view = memoryview(body)
    hashing = None  # hash piece i in a thread while piece i is written
    for start in range(0, len(view), CHUNK_BYTES):
        piece = view[start : start + CHUNK_BYTES]
        hashing = await _hash_next(hasher, piece, hashing)
        writer.write(piece)
        await _within(writer.drain(), idle_timeout_s, f"{who} stopped reading")
    if hashing is not None:
        await hashing
    writer.write(hasher.digest())
    await _within(writer.drain(), idle_timeout_s, f"{who} stopped reading")


async def write_error(
    writer: asyncio.StreamWriter, message: str, *, idle_timeout_s: float | None = None
) -> None:
    """Best effort: the peer may already be gone, or not reading."""
    try:
        await write_frame(
            writer, KIND_ERROR, message.encode("utf-8")[:MAX_ERROR_BYTES], idle_timeout_s=idle_timeout_s
        )
    except (ConnectionError, TransportError):
        pass


async def read_frame(
    reader: asyncio.StreamReader,
    max_bytes: int,
    *,
    who: str,
    idle_timeout_s: float | None = None,
    header_timeout_s: float | None = None,
    reserve: Callable[[int], None] | None = None,
) -> tuple[int, bytearray]:
    """Read one frame; check magic, version and size cap, then the sha256; return (kind, body).

    Args:
        max_bytes: the largest body accepted (ERROR frames: MAX_ERROR_BYTES).
        idle_timeout_s: limit for each read of a chunk or the trailer (None: no limit).
        header_timeout_s: limit for the header (a caller waiting for a reply passes None: its request
            timeout bounds the wait while the peer works); defaults to `idle_timeout_s`.
        reserve: called with each chunk's size before the body grows by it; raises TransportError
            to refuse (the server's budget of request bytes held at once).

    Raises TransportError (one line naming `who`) for a foreign, other-version, oversized, corrupted or
    stalled frame; asyncio.IncompleteReadError / ConnectionError if the stream ends early.
    """
    if header_timeout_s is None:
        header_timeout_s = idle_timeout_s
    header = await _within(reader.readexactly(HEADER.size), header_timeout_s, f"{who} sent no message")
    magic, version, kind, length = HEADER.unpack(header)
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
    body = bytearray()  # grows with what arrived, never with what the header claims
    hashing = None  # hash chunk i in a thread while chunk i + 1 arrives
    while len(body) < length:
        chunk = await _within(
            reader.readexactly(min(CHUNK_BYTES, length - len(body))),
            idle_timeout_s,
            f"{who} stalled after {len(body)} of {length} bytes",
        )
        if reserve is not None:
            reserve(len(chunk))
        body += chunk
        hashing = await _hash_next(hasher, chunk, hashing)
    if hashing is not None:
        await hashing
    trailer = await _within(reader.readexactly(TRAILER_BYTES), idle_timeout_s, f"{who} sent no checksum")
    if trailer != hasher.digest():
        raise TransportError(f"{who} sent a message whose sha256 does not match its body (corrupted)")
    return kind, body


async def _within(awaitable: Awaitable[T], timeout_s: float | None, stalled: str) -> T:
    """`awaitable`'s result, or TransportError("<stalled> for N s; stream cut") after `timeout_s`."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise TransportError(f"{stalled} for {timeout_s:g} s; stream cut") from None


async def _hash_next(
    hasher, piece: bytes | memoryview, previous: asyncio.Future | None
) -> asyncio.Future | None:
    """Wait for the previous piece's hash (order matters), then start this one's."""
    if previous is not None:
        await previous
    if len(piece) < _INLINE_HASH_BYTES:
        hasher.update(piece)
        return None
    return asyncio.get_running_loop().run_in_executor(None, hasher.update, piece)
