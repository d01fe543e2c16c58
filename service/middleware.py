"""HTTP edge guards as plain ASGI middleware: request ids with an access log line, and the request body limit."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.protocol import error_body

log = logging.getLogger("service.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Accepts a sane X-Request-ID or makes one, echoes it on the response, logs one line per request.

    The log line has the id, method, path, status and duration; never the body (prompts stay out of the logs).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s %s %d %.1fms",
                request_id,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - start) * 1000,
            )


class SizeLimitMiddleware:
    """431 for a header block over `header_limit` bytes, 413 for a body over `limit` bytes (by Content-Length or as
    it streams in), both in OpenAI's error shape. (uvicorn's own header bound only covers headers split across reads.)
    """

    def __init__(self, app: ASGIApp, limit: int, header_limit: int) -> None:
        self.app, self.limit, self.header_limit = app, limit, header_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.header_limit:
            await _error(send, 431, f"request headers exceed {self.header_limit} bytes", "headers_too_large")
            return
        too_large = f"request body exceeds {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _error(send, 413, too_large, "body_too_large")
            return
        # Read the body here (it is small by definition), reject past the limit, then replay it to the app.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.limit:
                await _error(send, 413, too_large, "body_too_large")
                return
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


BURST_DEFER_S = 0.1  # the longest an admitted request defers its work to the gate checks of later arrivals


class AdmissionGate:
    """429 at once, before the body is read or anything is tokenized, while `limit` generation requests are already
    in flight (running or waiting for a slot). Under a burst the refused are answered in microseconds instead of
    queueing behind the parsing and tokenization of those that will be served; the scheduler's own bounds
    (sequences, prompt tokens) still apply to the admitted. Counted on the event loop: no lock needed."""

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...]) -> None:
        self.app, self.limit, self.paths = app, limit, paths
        self.in_flight = 0
        self.arrivals = 0  # generation requests that reached the gate, refused or not
        self._quiet: asyncio.Event | None = None  # set when the current burst is over
        self._watcher: asyncio.Task[None] | None = None  # held: the event loop keeps only weak references to tasks

    async def _after_the_burst(self) -> None:
        """Waits until an event-loop pass brings no new request, for at most BURST_DEFER_S: in a burst, the requests
        behind reach the gate, and the refused get their answer, before the admitted start their work. One watcher
        task per burst, however many requests wait on it."""
        if self._quiet is None:
            self._quiet = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._quiet))
        await self._quiet.wait()

    async def _watch(self, quiet: asyncio.Event) -> None:
        until = time.perf_counter() + BURST_DEFER_S
        while True:
            seen = self.arrivals
            await asyncio.sleep(0)
            if self.arrivals == seen or time.perf_counter() > until:
                break
        self._quiet = None
        quiet.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        self.arrivals += 1
        if self.in_flight >= self.limit:
            message = f"server busy: {self.in_flight} requests are running or waiting (limit {self.limit})"
            await _error(send, 429, message, "overloaded", "rate_limit_error", [(b"retry-after", b"1")])
            return
        self.in_flight += 1
        try:
            await self._after_the_burst()
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _error(
    send: Send,
    status: int,
    message: str,
    code: str,
    kind: str = "invalid_request_error",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(message, kind, code=code))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += extra_headers or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode()})


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    """A receive() that returns `messages` first, then defers to `then` (to hear a client's disconnect)."""
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive
