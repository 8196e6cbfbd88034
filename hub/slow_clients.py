"""How long the registry (`loradock hub serve`) waits for a client's bytes: a request's headers must
arrive within `header_timeout` seconds, and its body may pause for at most `body_idle_timeout`
seconds at a time (LFS uploads stream gigabytes, so the gaps are bounded, not the whole body).
Without these, a client sending a byte a second holds a connection, and its slot, for as long as
it likes.

uvicorn bounds only the idle time of a kept-alive connection between requests, so both bounds are
written here by hand; neither uvicorn nor Starlette has a setting for them.
- `BoundedHeaderRead`: uvicorn's HTTP protocol with a deadline on the headers, from the first byte
  of a request (or from the connection's opening) until they are whole; then it answers 408 and
  closes. It has to be the protocol: the application sees a request only once its headers are in.
- `BoundBodyGaps`: ASGI, outermost: each wait for the next piece of a body is bounded; then the
  client is answered 408 (with `Connection: close`) and the route is told the client left, which
  every route handles already (an LFS upload removes what it received).
"""

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools' protocol when installed, else h11's

from hub.routes.deps import error_response

HEADER_TIMEOUT = 10.0  # seconds a request's headers may take to arrive
BODY_IDLE_TIMEOUT = 30.0  # seconds a request's body may pause


def too_slow(what: str, seconds: float) -> str:
    """The 408's message: `what` ("headers took", "body paused") for more than `seconds`."""
    return (f"the request's {what} more than {seconds:g} s: the registry closed the connection; send the request "
            "again, without pausing")


class BoundedHeaderRead(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (see the module docstring), with `header_timeout`; for `uvicorn.run(http=...)`
    as `functools.partial(BoundedHeaderRead, header_timeout=...)`."""

    def __init__(self, *args, header_timeout: float = HEADER_TIMEOUT, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline = None  # the timer of the headers being awaited, if any

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        request = self.cycle  # uvicorn starts a new cycle once a request's headers are whole
        if self.header_deadline is None and (request is None or request.response_complete):
            self._await_headers()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not request:
            self._stop_waiting()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_waiting(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if self.transport.is_closing():
            return
        message = too_slow("headers took", self.header_timeout)
        body = json.dumps({"error": message}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"x-error-message: %s\r\nconnection: close\r\n\r\n%s"
                             % (len(body), message.encode("ascii"), body))
        self.transport.close()


class BoundBodyGaps:
    """ASGI middleware: a request body that pauses for `idle` seconds ends the request (see the
    module docstring). Waits after the body is whole (a streaming answer listening for the
    client's disconnect) are not bounded."""

    def __init__(self, app: ASGIApp, idle: float = BODY_IDLE_TIMEOUT):
        self.app, self.idle = app, idle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_whole, started, cut_off = False, False, False

        async def bounded_receive() -> Message:
            nonlocal body_whole, cut_off
            if body_whole:
                return await receive()
            if cut_off:
                return {"type": "http.disconnect"}
            try:
                async with asyncio.timeout(self.idle):  # ~7 us per piece of body (anyio.fail_after: ~17)
                    message = await receive()
            except TimeoutError:
                if not started:
                    await send_408()
                cut_off = True
                return {"type": "http.disconnect"}  # the route stops, as when a client hangs up
            body_whole = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def send_408() -> None:
            response = error_response(408, too_slow("body paused for", self.idle))
            response.headers["Connection"] = "close"
            await response(scope, receive, send)

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut_off:
                return  # the 408 went out (or the answer was cut short): nobody is left to answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except Exception:
            if not cut_off:
                raise
            # the route failed on the disconnect it was handed; the client has its 408 already
