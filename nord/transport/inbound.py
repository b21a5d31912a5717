"""`Inbound`: which streams from other peers this peer serves at once, so nobody can exhaust it.

Every inbound stream costs an asyncio task and a read buffer of at most one chunk while it is read, and a
handler thread while its handler runs. So:

- at most `per_peer` streams from one peer and `total` from all are served at once; a stream over a cap
  gets an ERROR frame that says so (the caller sees it as one line) and is closed unread;
- at most `calls_per_peer` handler calls of one peer run at once (its other streams wait without a
  thread), so a peer that floods or whose requests are slow cannot starve other peers' requests;
- at most `max_bytes` of request bodies are held at once over all streams (from the first byte read
  until the handler returns): a request that would go over is cut with an ERROR frame.

Used only from the transport's event loop thread: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from nord.errors import TransportError

logger = logging.getLogger("nord.transport")


@dataclass
class _Load:
    """One peer's open inbound streams, its handler-call slots and the refusals since it had none open."""

    streams: int
    calls: asyncio.Semaphore
    refused: int = field(default=0)


class Inbound:
    """Counts open inbound streams per peer; `admit` before serving one, `release` after."""

    def __init__(self, *, per_peer: int, total: int, calls_per_peer: int, max_bytes: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self.calls_per_peer = calls_per_peer
        self.max_bytes = max_bytes
        self.open = 0
        self.held_bytes = 0  # request bytes received and not yet released
        self.refused = 0  # streams refused so far, over either cap
        self._load: dict[str, _Load] = {}  # only peers with streams open

    def admit(self, peer: str, who: str) -> str | None:
        """Count a new stream from `peer` (named `who` in logs); the refusal to send instead if over a cap."""
        load = self._load.get(peer)
        if load is not None and load.streams >= self.per_peer:
            self.refused += 1
            load.refused += 1
            if load.refused & (load.refused - 1) == 0:  # 1st, 2nd, 4th, 8th ...: a flood is not a log flood
                logger.info(
                    "refused %d stream(s) from %s over its cap of %d", load.refused, who, self.per_peer
                )
            return (
                f"too many concurrent streams from your peer (limit {self.per_peer} per peer); "
                "retry when your earlier requests have finished"
            )
        if self.open >= self.total:
            self.refused += 1
            logger.debug("refused a stream from %s: %d streams open", who, self.total)
            return f"this peer is serving its limit of {self.total} streams; retry later"
        if load is None:
            load = self._load[peer] = _Load(streams=0, calls=asyncio.Semaphore(self.calls_per_peer))
        load.streams += 1
        self.open += 1
        return None

    def release(self, peer: str) -> None:
        load = self._load[peer]
        load.streams -= 1
        self.open -= 1
        if load.streams == 0:
            del self._load[peer]

    def request_bytes(self) -> RequestBytes:
        """An account for one request's bytes against `max_bytes`."""
        return RequestBytes(self)

    def calls(self, peer: str) -> asyncio.Semaphore:
        """The handler-call slots of `peer` (which has an admitted stream open)."""
        return self._load[peer].calls


async def discard_until_closed(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> None:
    """After refusing a request unread, let the caller read why before the stream goes away.

    Closing with unread incoming bytes can reset the stream and lose the error frame already sent; so
    read and drop what still arrives until the caller hangs up, for at most `timeout_s`.
    """

    async def drain() -> None:
        while await reader.read(1 << 20):
            pass

    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(drain(), timeout_s)


class RequestBytes:
    """One request's bytes held against its `Inbound`'s budget: `reserve` as they arrive, `release` once."""

    def __init__(self, inbound: Inbound) -> None:
        self._inbound = inbound
        self.held = 0

    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` more; TransportError (the refusal to send) if the budget would be passed."""
        inbound = self._inbound
        if inbound.held_bytes + nbytes > inbound.max_bytes:
            raise TransportError(
                f"this peer is holding its limit of {inbound.max_bytes >> 20} MiB of incoming requests; "
                "retry later"
            )
        inbound.held_bytes += nbytes
        self.held += nbytes

    def release(self) -> None:
        self._inbound.held_bytes -= self.held
        self.held = 0
