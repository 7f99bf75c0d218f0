"""The probe listener: a minimal HTTP/1.1 server for /healthz and /readyz.

``/healthz`` answers 200 while the process serves (liveness: Docker's
HEALTHCHECK). ``/readyz`` answers 200 only while the backend greeted lately
and ftpfix is not draining after SIGTERM, else 503 with the reason
(readiness: a load balancer or Kubernetes). Neither opens an FTP session: the
answers come from state that ``readiness.py`` keeps in the background.

The routes are a table from path to a function that builds the response, so
another endpoint (Prometheus' /metrics, later) is one more entry.

This listener is a trust boundary like the control port: whatever reaches
it, a probe or a scanner, is read within bounds. A request head is at most
``MAX_REQUEST_HEAD`` bytes and must arrive, and its answer leave, within
``REQUEST_TIMEOUT`` seconds; at most ``MAX_CONNECTIONS`` are served at once,
and more are closed at once. Anything that is not a plain GET or HEAD of a
known path gets a 4xx, and every connection is closed after one answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import structlog
import trio

from ..config import Config, HostPort
from .readiness import Readiness

#: Longest request head (request line and headers) read; a probe sends ~100 bytes.
MAX_REQUEST_HEAD = 8192

#: Seconds from accept until the answer has been sent: a slow or silent peer
#: (slowloris) is closed after this long.
REQUEST_TIMEOUT = 5.0

#: Connections served at once; more are closed unanswered, so a flood holds
#: at most this many descriptors.
MAX_CONNECTIONS = 32

#: Seconds the 408 to a too slow peer may take to leave.
PARTING_TIMEOUT = 0.5

#: After an error answer, what the peer still sends is read and dropped for
#: at most this long and this many bytes, so the answer is not lost to a reset.
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 64 * 1024

#: Bytes read from the socket at a time.
RECEIVE_SIZE = 4096

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

# RFC 9112 section 3: method SP request-target SP HTTP-version. The target
# is origin-form (RFC 9112 section 3.2.1); only visible ASCII is accepted.
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) (HTTP/1\.[01])")
_HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*")


@dataclass(frozen=True, slots=True)
class Response:
    """One answer; ``body`` is plain text unless ``content_type`` says otherwise."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]


class HttpError(Exception):
    """The request cannot be answered; ``status`` is the 4xx/5xx it gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_request_head(head: bytes) -> tuple[str, str]:
    """(method, path) of a request head without its blank line; raises HttpError.

    Lines may end with CRLF or a bare LF (RFC 9112 section 2.2 lets a server
    accept LF). Header fields are checked for shape and otherwise ignored.
    """
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        if lines[0].startswith(b"HTTP/") or re.fullmatch(rb"[A-Z]+ /\S* HTTP/\d(\.\d)?", lines[0]):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1")
        raise HttpError(400, "not an HTTP request line")
    if not all(_HEADER_LINE.fullmatch(line) for line in lines[1:]):
        raise HttpError(400, "malformed header field")
    method, target, _ = match.groups()
    return method.decode("ascii"), target.decode("ascii").split("?", 1)[0]


def respond(routes: Mapping[str, Route], method: str, path: str) -> Response:
    """The answer to ``method path``; raises HttpError for anything but GET/HEAD of a route."""
    route = routes.get(path)
    if route is None:
        raise HttpError(404, f"no such path; try {', '.join(routes)}")
    if method not in ("GET", "HEAD"):
        raise HttpError(405, "only GET and HEAD")
    return route()


def serialize(response: Response, *, head_only: bool = False) -> bytes:
    """The response's bytes; every answer closes the connection."""
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + (b"" if head_only else response.body)


async def read_request_head(stream: trio.abc.Stream) -> bytes | None:
    """The request head up to its blank line, or None if the peer sent nothing.

    Error handling: raises HttpError(431) past MAX_REQUEST_HEAD bytes, and
    HttpError(400) when the peer stops sending halfway through a head.
    """
    data = bytearray()
    while True:
        ends = [found for found in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if found >= 0]
        if min(ends, default=len(data)) > MAX_REQUEST_HEAD:
            raise HttpError(431, f"request head over {MAX_REQUEST_HEAD} bytes")
        if ends:
            return bytes(data[: min(ends)])
        chunk = await stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            if not data:
                return None
            raise HttpError(400, "the request head ended early")
        data += chunk


async def answer(stream: trio.abc.Stream, routes: Mapping[str, Route]) -> None:
    """Read one request from ``stream``, answer it and close.

    Resource handling: ``stream`` is closed on every path.

    Error handling: this is one connection's failure boundary. A bad request
    gets its 4xx; a peer that is too slow gets a 408 at best; a peer that
    resets is dropped; a bug is logged and ends this connection only.
    """
    answered = False
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                head = await read_request_head(stream)
                if head is None:
                    return
                method, path = parse_request_head(head)
                response = respond(routes, method, path)
            except HttpError as error:
                method, response = "GET", Response(error.status, f"{error}\n".encode())
            answered = True
            await stream.send_all(serialize(response, head_only=method == "HEAD"))
            if response.status >= 400:
                await _linger(stream)
        if not answered:
            # Too slow to send a request: say so, briefly, and close.
            with trio.move_on_after(PARTING_TIMEOUT):
                await stream.send_all(serialize(Response(408, b"request timeout\n")))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:  # noqa: BLE001 - one probe connection's failure boundary
        structlog.get_logger("ftpfix").exception("probe request crashed: this is a bug in ftpfix")
    finally:
        await trio.aclose_forcefully(stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read and drop what the peer still sends, within bounds.

    Closing with unread bytes makes the kernel send a reset, which can destroy
    the error answer before the peer read it (RFC 9112 section 9.6).
    """
    with trio.move_on_after(LINGER_TIMEOUT):
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        dropped = 0
        while dropped < LINGER_BYTES and (chunk := await stream.receive_some(RECEIVE_SIZE)):
            dropped += len(chunk)


async def _serve_one(limiter: trio.CapacityLimiter, routes: Mapping[str, Route], stream: trio.SocketStream) -> None:
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        await trio.aclose_forcefully(stream)
        return
    try:
        await answer(stream, routes)
    finally:
        limiter.release()


async def open_health_listeners(address: HostPort) -> list[trio.SocketListener]:
    """Listeners on ``address``; raises OSError as trio.open_tcp_listeners does."""
    return await trio.open_tcp_listeners(address.port, host=address.host)


async def serve_health(
    listeners: list[trio.SocketListener],
    routes: Mapping[str, Route],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer probes on ``listeners`` until cancelled; ``task_status.started``
    reports the bound addresses as "host:port".

    Resource handling: the listeners and every connection are closed when
    this returns (trio.serve_listeners owns them).
    """
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    task_status.started([str(HostPort(*listener.socket.getsockname()[:2])) for listener in listeners])
    await trio.serve_listeners(partial(_serve_one, limiter, routes), listeners)


def probe_routes(readiness: Readiness, current: Callable[[], Config]) -> dict[str, Route]:
    """/healthz and /readyz; ``current`` returns the running config (reloads change it)."""

    def healthz() -> Response:
        draining = " (draining after SIGTERM)" if readiness.stopping.is_set() else ""
        return Response(200, f"ok: serving{draining}\n".encode())

    def readyz() -> Response:
        config = current()
        ready, reason = readiness.verdict(
            trio.current_time(), config.metrics.ready_interval, config.backend.connect_timeout
        )
        return Response(200 if ready else 503, f"{'ready' if ready else 'not ready'}: {reason}\n".encode())

    return {"/healthz": healthz, "/readyz": readyz}
