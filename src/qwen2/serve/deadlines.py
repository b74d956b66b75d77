"""Read deadlines, so a slow or silent client cannot hold a connection (and SIGTERM) for ever.

- Headers: uvicorn times out only idle keep-alive connections; a client that connects and then sends
  its headers a byte at a time ("slowloris") is held indefinitely. `HeaderDeadlineProtocol` (uvicorn's
  h11 protocol plus one timer) closes a connection whose request headers are not complete
  `header_timeout` seconds after it opened or after its last response.
- Body: the app is called once the headers are in; `BodyDeadline` (ASGI middleware) gives the body
  `body_timeout` seconds. Past it the app reads a disconnect; Server.body answers 408 with
  `Connection: close`, so the socket closes.
- Shutdown: uvicorn's `timeout_graceful_shutdown` cancels what is still running after it.
Each timeout is logged in one line.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("qwen2.serve")

TIMED_OUT = "qwen2.body_timed_out"  # scope key BodyDeadline sets when the body missed its deadline


class BodyDeadline:
    """ASGI middleware: the request body must arrive within `timeout` seconds of the headers."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        done = False

        async def receive_by_deadline():
            nonlocal done
            if done:  # the body is in: later reads wait for a disconnect, which may take any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                done = True
                scope[TIMED_OUT] = True
                client = scope.get("client") or ("?", 0)
                log.warning(
                    "%s:%s: request body not complete after %gs; closing", client[0], client[1], self.timeout
                )
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        await self.app(scope, receive_by_deadline, send)


def protocol(header_timeout: float):
    """uvicorn's h11 protocol plus a deadline for each request's headers, for uvicorn.Config(http=...).
    Built here, not at import: uvicorn is the serve extra's, which create_app does not need."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request's headers are in: BodyDeadline takes over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _arm(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._expire)

        def _expire(self) -> None:
            self._header_timer = None
            # A request whose headers are in has a cycle with its response still to come: not timed here.
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            client = self.client or ("?", 0)
            log.warning("%s:%s: request headers not complete after %gs; closing", *client[:2], header_timeout)
            self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(app, *, host: str, port: int, limits, log_level: str = "info", **kw):
    """uvicorn.Config for the app with the read deadlines and the graceful-shutdown timeout of `limits`."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol(limits.header_timeout),
        timeout_graceful_shutdown=max(1, round(limits.shutdown_timeout)),
        **kw,
    )
