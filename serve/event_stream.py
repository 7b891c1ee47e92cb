"""`EventStreamResponse`: a `text/event-stream` response for the chat relay, one ASGI message per relayed piece.

Starlette's `StreamingResponse` does the same job for any iterator, and pays per response for its generality: an
anyio task group, a second task watching for the client's disconnect, cancel scopes (bench/README.md has the cost
as measured). This one sends the pieces from the request's own task and watches for the
disconnect with one plain asyncio task. When the client goes away before the end, the sending task is cancelled
where it waits (usually on vLLM's next token): the relay's `finally` then closes the upstream response, which makes
vLLM abort the generation, and `on_close` runs either way (it releases the caller's concurrency slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], None] | None = None,
    ):
        self.events = events
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.current_task()
        state = {"sending": True, "disconnected": False}

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                continue
            if state["sending"]:
                state["disconnected"] = True
                sender.cancel()

        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for piece in self.events:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
            state["sending"] = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise  # a cancellation from elsewhere (shutdown) goes on up
            sender.uncancel()
        finally:
            state["sending"] = False
            watcher.cancel()
            await self.events.aclose()  # at once, not at garbage collection: the relay's finally closes vLLM's stream
            if self.on_close is not None:
                self.on_close()
