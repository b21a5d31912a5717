"""`RequestGate`: ASGI middleware that refuses a request before the app reads (or buffers) its body.

In order, on the raw ASGI messages, so nothing of a refused body is held in memory:

1. admin paths (`/api/admin...`) need `Authorization: Bearer <NORD_ADMIN_TOKEN>`: 403 when the admin API is
   disabled, 401 without the right token, decided from the headers alone;
2. a `Content-Length` above `max_body_bytes` (or not a plain decimal number) is a 413 (400);
3. a body sent without a length (chunked) is counted as it is received: past `max_body_bytes` the client
   gets a 413 and the app sees a disconnect.

Any response to a request whose body was not read to the end carries `Connection: close`, so the server
stops reading the rest instead of draining it for keep-alive.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 64 * 1024  # the API takes no uploads: an admin body is {"reason": <= 500 characters}
ADMIN_PREFIX = "/api/admin"
MAX_LENGTH_DIGITS = 19  # a Content-Length beyond this is refused without converting it


class RequestGate:
    """Refuse oversized bodies and unauthenticated admin requests before the app reads anything.

    Args:
        app: the ASGI app behind the gate.
        admin_token: the bearer token admin paths need; None disables the admin API (403).
        max_body_bytes: the largest request body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, *, admin_token: str | None, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.admin_token = admin_token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await _send_json(send, *refusal)
            return
        await _BodyCounter(self.app, self.max_body_bytes, expects_body=_expects_body(headers))(
            scope, receive, send
        )

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str, dict[str, str]] | None:
        if path.startswith(ADMIN_PREFIX):
            if not self.admin_token:
                return 403, "admin API disabled: start the coordinator with NORD_ADMIN_TOKEN set", {}
            scheme, _, token = headers.get("authorization", "").partition(" ")
            challenge = {"www-authenticate": "Bearer"}
            if scheme.lower() != "bearer" or not token:
                return 401, "admin API needs 'Authorization: Bearer <token>'", challenge
            if not hmac.compare_digest(token.encode(), self.admin_token.encode()):
                return 401, "wrong admin token", challenge
        length = headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit() and len(length) <= MAX_LENGTH_DIGITS):
                return 400, f"bad Content-Length {length[:40]!r}", {}
            if int(length) > self.max_body_bytes:
                return 413, f"request body of {int(length)} bytes; the limit is {self.max_body_bytes}", {}
        return None


def _expects_body(headers: dict[str, str]) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


class _BodyCounter:
    """One request: counts body bytes as the app receives them and marks unread bodies `close`."""

    def __init__(self, app: ASGIApp, limit: int, *, expects_body: bool):
        self.app, self.limit = app, limit
        self.received = 0
        self.body_done = not expects_body
        self.responded = False  # the response has started (by the app or by the refusal here)
        self.refused = False

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self.refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
                self.body_done = not message.get("more_body", False)
                if self.received > self.limit:
                    self.refused = True
                    if not self.responded:
                        self.responded = True
                        await _send_json(send, 413, f"request body over the limit of {self.limit} bytes", {})
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if self.refused:
                return  # the client already has its 413
            if message["type"] == "http.response.start":
                self.responded = True
                if not self.body_done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


async def _send_json(send: Send, status: int, error: str, headers: dict[str, str]) -> None:
    body = json.dumps({"error": error}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
