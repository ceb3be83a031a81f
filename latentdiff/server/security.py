"""ASGI middleware in front of the whole app (API and UI alike): HTTP Basic auth and a bound on request bodies."""
from __future__ import annotations

import base64
import hmac
import json


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class BasicAuth:
    """Every request needs `Authorization: Basic user:pass` (401 without it; browsers then ask for it)."""

    def __init__(self, app, user: str, password: str):
        self.app = app
        self.expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: no guessing by timing
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                return await _reply(send, 401, "authentication required (--api-auth)",
                                    [(b"www-authenticate", b'Basic realm="latentdiff"')])
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies over `limit` bytes are refused with 413 before they are read (by their Content-Length) or as soon as
    they pass it (a chunked body is read here first), so a huge upload never reaches the app or fills memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if int(length) > self.limit:
                return await _reply(send, 413, f"the request body is {int(length)} bytes; the server takes at most {self.limit}")
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _reply(send, 413, f"the request body is over the server's {self.limit} bytes")
            if not message.get("more_body"):
                break
        body, done = b"".join(chunks), False

        async def replay():
            nonlocal done
            if done:
                return await receive()
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
