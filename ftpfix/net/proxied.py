"""Who a control connection really comes from, when a load balancer sends a
PROXY protocol header (``[listen] proxy_protocol``), and the header ftpfix
sends its own backend (``[backend] proxy_protocol``).

Theory of operation
-------------------
Only a peer in ``[listen] trusted_proxies`` is asked for a header; anyone
else is served as a direct client, by its own address, and a header it sends
anyway is refused by the core (``Session``: closed with a log line, never
believed). From a trusted peer, a header is required: garbage, a malformed or
unsupported header, or none in time closes the connection with a log line.
The parsing is the pure ``ftpfix.protocol.proxyheader``.

FTP's server speaks first, and balancers differ in when they send the header:

- HAProxy (``send-proxy``, ``send-proxy-v2``), nginx and most ingress
  controllers send it as soon as their connection to ftpfix is up.
- AWS's Network Load Balancer sends it only together with the client's first
  bytes (pires/go-proxyproto issue 25), and an FTP client sends nothing until
  it has read the server's 220. Waiting for the header alone would deadlock.

So a trusted peer gets ``PROXY_HEADER_WAIT`` seconds. A header in that time
(the first kind) is the normal case: the session is admitted by the client's
real address, the backend is dialed, and the client reads the backend's own
greeting. When nothing comes (the second kind), ftpfix greets the client with
a 220 of its own (``OWN_GREETING``) and reads the header from the front of
the client's first command, for up to ``[limits] login_timeout``; the
backend's greeting is then dropped (``Session.greeted``) unless it refuses
the session.

The trade-off of the second way: admission waits for the header, so a
refused client (``[access]``, ``max_sessions_per_ip``, a full server) gets
its 421 in answer to its first command instead of at connect; it costs
nothing else, since nothing is dialed and no session counted before the
header names the client. And the client never sees the backend's banner.
Both ways work with either balancer: a header that arrives after the wait (a
slow or loaded link to the balancer) is read the second way, so the wait
only decides whose 220 the client reads; an NLB client waits
``PROXY_HEADER_WAIT`` for it.

A header that says ``LOCAL`` (v2: the balancer's own health check) or
``UNKNOWN`` is served as a connection from the balancer itself.

Resource handling: nothing here opens or closes a connection; the caller
closes the stream when this returns None.

Error handling: every failure is logged here and returned as None; nothing
is raised but cancellation.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import trio
from structlog.typing import FilteringBoundLogger

from ..config import BackendProxyProtocol, Config
from ..protocol.proxyheader import (
    MAX_V2_LENGTH,
    V2_FIXED,
    V2_LOCAL,
    Command,
    ProxyHeaderError,
    format_v1,
    format_v2,
    parse,
)
from .streams import say_last

#: Seconds a trusted balancer has, from accept, to send its header before
#: ftpfix greets the client itself (see the module). HAProxy sends it right
#: after the handshake, so it is here in well under this on any sane link; an
#: NLB client waits this long for its 220.
PROXY_HEADER_WAIT = 0.5

#: Seconds from a header's first byte to its last: a real one is one TCP
#: segment, so this only bounds a peer that trickles it (slowloris).
PROXY_HEADER_TIMEOUT = 5.0

#: Bytes asked of the socket per read while the header is incomplete.
HEADER_READ_SIZE = V2_FIXED + MAX_V2_LENGTH

#: The 220 ftpfix sends itself when the balancer holds the header back.
OWN_GREETING = b"220 FTP service ready.\r\n"

#: The reply to a first command that came without the header it needed,
#: once ftpfix has greeted (before that, the connection just closes).
NO_HEADER = b"421 Service not available: no PROXY protocol header from the load balancer.\r\n"


@dataclass(frozen=True, slots=True)
class Arrival:
    """Where a control connection comes from, once its header (if any) is read.

    ``client`` is the real client's address and port, or the peer's when it
    sent no header or one without a client (LOCAL, UNKNOWN). ``dialed`` is
    the address and port the client dialed on the balancer, when a header said
    so. ``via`` is the balancer that sent the header. ``rest`` is what the
    peer sent after the header: the client's first bytes. ``greeted`` is True
    when ftpfix already sent ``OWN_GREETING``. ``accepted`` is when the
    connection came (trio time): ``login_timeout`` runs from then, the wait
    for the header included.
    """

    client: tuple[str, int]
    dialed: tuple[str, int] | None = None
    via: str | None = None
    rest: bytes = b""
    greeted: bool = False
    accepted: float | None = field(default=None, compare=False)


def trusted(config: Config, host: str) -> bool:
    """True if ``host`` may send a PROXY header under ``config``."""
    listen = config.listen
    if not listen.proxy_protocol:
        return False
    address = ipaddress.ip_address(host)
    return any(address in network for network in listen.trusted_proxies)


async def receive_proxy_header(
    stream: trio.abc.Stream,
    peer: tuple[str, int],
    login_timeout: float,
    log: FilteringBoundLogger,
    *,
    greet: bool = True,
) -> Arrival | None:
    """Read a trusted peer's PROXY header; None (logged) if the connection must close.

    ``login_timeout`` bounds the wait for a header that comes with the
    client's first command (see the module). ``greet`` False: never greet
    in plain text meanwhile (the implicit FTPS port, where the client speaks
    first, with its ClientHello, and a plain 220 would break its handshake).
    """
    where = {"proxy": f"{peer[0]}:{peer[1]}"}
    received = b""
    greeted = False
    started = trio.current_time()
    try:
        with trio.move_on_after(PROXY_HEADER_WAIT):
            received = bytes(await stream.receive_some(HEADER_READ_SIZE))
            if not received:
                log.info("balancer closed before sending a PROXY header (a TCP health check?)", **where)
                return None
        if not received and greet:
            await stream.send_all(OWN_GREETING)
            greeted = True
        deadline = started + (login_timeout if greeted or not received else PROXY_HEADER_TIMEOUT)
        first_byte = trio.current_time() if received else None
        header = parse(received)
        while header is None:
            limit = deadline if first_byte is None else min(deadline, first_byte + PROXY_HEADER_TIMEOUT)
            with trio.move_on_at(limit):
                chunk = bytes(await stream.receive_some(HEADER_READ_SIZE))
                if not chunk:
                    log.warning(
                        "connection closed before its PROXY header was complete",
                        received=len(received),
                        **where,
                    )
                    return None
                first_byte = first_byte if first_byte is not None else trio.current_time()
                received += chunk
                header = parse(received)
                continue
            log.warning(
                "no complete PROXY header in time; closing",
                received=len(received),
                seconds=round(trio.current_time() - started, 3),
                **where,
            )
            return None
    except ProxyHeaderError as error:
        log.warning("bad PROXY header from a trusted proxy; closing", error=str(error), **where)
        if greeted:
            await say_last(stream, NO_HEADER)
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as error:
        log.info("connection lost before its PROXY header", error=str(error), **where)
        return None
    rest = received[header.length :]
    if header.command is not Command.PROXY or header.client is None:
        log.info(
            "PROXY header without a client: served as the balancer's own connection",
            command=header.command.value,
            version=header.version,
            **where,
        )
        return Arrival(client=peer, via=peer[0], rest=rest, greeted=greeted, accepted=started)
    return Arrival(
        client=header.client, dialed=header.dialed, via=peer[0], rest=rest, greeted=greeted, accepted=started
    )


#: Seconds between looks at a data connection's header while it is
#: incomplete (``receive_data_header`` peeks, so readiness stays set).
DATA_HEADER_POLL = 0.01


async def receive_data_header(sock: socket.socket, peer: str, log: FilteringBoundLogger) -> str | None:
    """The real client behind a data connection a trusted balancer forwarded:
    its address, from the PROXY header at the front of ``sock``; the
    balancer's own for LOCAL or UNKNOWN; None (logged) when the connection must close.

    For ``[passive]`` ports the balancer forwards too (HAProxy ``send-proxy``
    on them). The header is consumed exactly, by peeking first, so the bytes
    behind it (an upload's first) stay in the socket for the relay, which
    splices from the socket itself. A balancer that sends its header only with
    the client's first bytes (AWS NLB) cannot serve passive downloads this
    way: the client sends nothing on them, so the header never comes and the
    connection closes after ``PROXY_HEADER_TIMEOUT``.

    Error handling: every failure is logged and returned as None.
    """
    seen = b""
    with trio.move_on_after(PROXY_HEADER_TIMEOUT):
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    peeked = sock.recv(HEADER_READ_SIZE, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                if not peeked:
                    log.warning("data connection closed before its PROXY header", proxy=peer, received=len(seen))
                    return None
                header = parse(peeked)
                if header is not None:
                    sock.recv(header.length)  # exactly the header: what follows is the client's
                    return header.client[0] if header.client is not None else peer
                if peeked == seen:
                    await trio.sleep(DATA_HEADER_POLL)  # nothing new: readiness stays set while peeking
                seen = peeked
        except ProxyHeaderError as error:
            log.warning("bad PROXY header on a data connection; closing", proxy=peer, error=str(error))
            return None
        except OSError as error:
            log.info("data connection lost before its PROXY header", proxy=peer, error=str(error))
            return None
    log.warning("no complete PROXY header on a data connection in time; closing", proxy=peer, received=len(seen))
    return None


def backend_header(mode: BackendProxyProtocol, client: tuple[str, int] | None, dialed: tuple[str, int] | None) -> bytes:
    """The PROXY header that opens a backend connection under ``[backend] proxy_protocol``
    (empty when off). ``client`` None is ftpfix's own connection (the /readyz check):
    v2 says LOCAL, v1 UNKNOWN."""
    match mode:
        case BackendProxyProtocol.OFF:
            return b""
        case BackendProxyProtocol.V1:
            return format_v1(client, dialed)
        case BackendProxyProtocol.V2:
            if client is None:
                return V2_LOCAL
            return format_v2(client, dialed)
    raise ValueError(mode)


class PrefixedStream(trio.abc.HalfCloseableStream):
    """``stream``, with ``prefix`` (bytes already read from it) read first.

    The bytes that followed a PROXY header in the same segment are the
    client's; the dispatcher reads them through this as if they had just come.
    ``transport_stream`` lets ``ControlStream`` find the socket beneath.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.transport_stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
