"""The frame every message on a Nord stream is, and its checked reading and writing.

    header   magic b"NORD" | protocol version u16 | kind u8 | 0 u8 | body length u64     (16 bytes)
    body     `length` bytes, written in 1 MiB pieces
    trailer  sha256(body)                                                                 (32 bytes)

The receiver checks magic, version and the size cap from the header before reading any body, and the
sha256 before returning the body: nothing unverified reaches a handler. The hash travels after the body
so both ends hash while the bytes move (hashing 100 MB takes about as long as sending it on loopback).
Magic and version come first in every frame of every version, so a peer of another release is told so.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct

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


async def write_frame(writer: asyncio.StreamWriter, kind: int, body: bytes | bytearray) -> None:
    writer.write(HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(body)))
    hasher = hashlib.sha256()
    view = memoryview(body)
    hashing = None  # hash piece i in a thread while piece i is written
    for start in range(0, len(view), CHUNK_BYTES):
        piece = view[start : start + CHUNK_BYTES]
        hashing = await _hash_next(hasher, piece, hashing)
        writer.write(piece)
        await writer.drain()
    if hashing is not None:
        await hashing
    writer.write(hasher.digest())
    await writer.drain()


async def write_error(writer: asyncio.StreamWriter, message: str) -> None:
    """Best effort: the peer may already be gone."""
    try:
        await write_frame(writer, KIND_ERROR, message.encode("utf-8")[:MAX_ERROR_BYTES])
    except ConnectionError:
        pass


async def read_frame(reader: asyncio.StreamReader, max_bytes: int, *, who: str) -> tuple[int, bytearray]:
    """Read one frame; check magic, version and size cap, then the sha256; return (kind, body).

    Raises TransportError (one line naming `who`) for a foreign, other-version, oversized or corrupted
    frame; asyncio.IncompleteReadError / ConnectionError if the stream ends early.
    """
    magic, version, kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
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
    body = bytearray(length)
    view = memoryview(body)
    hashing = None  # hash piece i in a thread while piece i + 1 arrives
    pos = 0
    while pos < length:
        chunk = await reader.readexactly(min(CHUNK_BYTES, length - pos))
        view[pos : pos + len(chunk)] = chunk
        hashing = await _hash_next(hasher, view[pos : pos + len(chunk)], hashing)
        pos += len(chunk)
    if hashing is not None:
        await hashing
    if await reader.readexactly(TRAILER_BYTES) != hasher.digest():
        raise TransportError(f"{who} sent a message whose sha256 does not match its body (corrupted)")
    return kind, body


async def _hash_next(hasher, piece: memoryview, previous: asyncio.Future | None) -> asyncio.Future | None:
    """Wait for the previous piece's hash (order matters), then start this one's."""
    if previous is not None:
        await previous
    if len(piece) < _INLINE_HASH_BYTES:
        hasher.update(piece)
        return None
    return asyncio.get_running_loop().run_in_executor(None, hasher.update, piece)
