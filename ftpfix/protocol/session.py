"""The control-channel state machine of one proxied FTP session.

Theory of operation
-------------------
ftpfix relays a client's control connection to one backend connection. Bytes
from either side go in through ``Session.receive_data``; a list of commands
(``ftpfix.protocol.commands``) comes out, for the shell to execute in order.

FTP is strictly request/reply (RFC 959 section 4.2): every command gets exactly
one final reply (codes 2xx to 5xx), perhaps after preliminary ones (1xx), and
replies come back in the order the commands were sent. The session keeps that
order in one FIFO, ``_pending``:

- A command relayed to the backend appends a ``_Forwarded`` entry, popped when
  its final reply comes back. The backend's greeting is the answer to a
  pseudo-command that the connection itself sends.
- A command that ftpfix answers itself (an empty line, an over-long line,
  ``EPSV 2``) appends a ``_Local`` entry with the reply. It is sent only when
  every command before it has been answered, so a client that pipelines still
  reads its replies in order.

Knowing which command each reply answers is what makes the 227 rewrite safe:
only a 227 that answers a pending PASV (or an EPSV that ftpfix translated
into PASV) opens a mapping. A 227 quoted in a 550, a file name with six
numbers in it, or a 227 answering ``SITE`` is relayed as text and opens
nothing. This is the defence against reply injection of the NAT-slipstreaming
kind, which fools helpers that pattern-match the byte stream.

When such a 227 is complete the session emits ``OpenPassive`` and pauses: it
reads no more replies until the shell calls ``passive_opened`` (the public port
is listening) or ``passive_failed`` (no port). Replies that arrive meanwhile stay
buffered, so the rewritten 227 reaches the client in its place in the stream.

Before the final reply to a transfer command it emits ``FinishTransfer``, so the
shell can hold "226 Transfer complete" until the data relay has delivered the
last byte to the client.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from types import MappingProxyType

from .commands import Close, Command, FinishTransfer, Note, OpenPassive, SendTo, Side
from .errors import BackendError
from .grammar import (
    CRLF,
    AddressError,
    ReplyFramer,
    ReplyLine,
    format_227,
    format_229,
    parse_227,
    split_command,
    telnet_text,
)
from .lines import TOO_LONG, LineBuffer

#: Pseudo-verb of the "command" the backend's greeting answers.
GREETING = b""

#: Commands whose final reply may only go to the client once the data relay has
#: finished (RFC 959 section 4.1.3 lists the ones that use a data connection).
TRANSFER_VERBS = frozenset({b"RETR", b"STOR", b"STOU", b"APPE", b"LIST", b"NLST", b"MLSD"})

#: Client verbs ftpfix answers with a mapping of its own.
PASSIVE_VERBS = frozenset({b"PASV", b"EPSV"})

#: Data-connection setup commands refused after ``EPSV ALL`` (RFC 2428 section 4).
REFUSED_AFTER_EPSV_ALL = frozenset({b"PASV", b"PORT", b"EPRT", b"LPRT", b"LPSV"})

#: Longest reply line accepted from the backend. A directory listing sent on
#: the control channel (STAT) has one file per line, and paths are at most
#: 4096 bytes on Linux, so this leaves room while keeping memory bounded.
MAX_REPLY_LINE = 64 * 1024

#: Longest 227 reply held for parsing, all lines together. Real ones are one
#: line of under 100 bytes; ProFTPD's longest banner-style variant is a few
#: hundred.
MAX_PASSIVE_REPLY = 8 * 1024

#: Commands whose argument is never logged.
SECRET_VERBS = frozenset({b"PASS", b"ACCT"})


def _default_aliases() -> Mapping[bytes, bytes]:
    return MappingProxyType({b"P@SW": b"PASV"})


@dataclass(frozen=True, slots=True)
class Policy:
    """The parts of the configuration that the core needs.

    ``aliases`` maps upper-cased verbs to the verb the backend receives: the
    default repairs the SMC Barricade's mangling of PASV into P@SW.
    """

    aliases: Mapping[bytes, bytes] = field(default_factory=_default_aliases)
    max_line: int = 4096
    max_long_lines: int = 3


@dataclass(slots=True)
class _Forwarded:
    verb: bytes


@dataclass(slots=True)
class _Local:
    reply: bytes


def _reply(text: str) -> bytes:
    return text.encode("ascii") + CRLF


class Session:
    """One client's control connection and its backend's, as a state machine.

    Feed it with ``receive_data`` and ``connection_closed``; answer its
    ``OpenPassive`` with ``passive_opened`` or ``passive_failed``.
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy if policy is not None else Policy()
        self.user: str | None = None
        self._client_lines = LineBuffer(self.policy.max_line)
        self._server_lines = LineBuffer(MAX_REPLY_LINE)
        self._framer = ReplyFramer()
        self._pending: deque[_Forwarded | _Local] = deque([_Forwarded(GREETING)])
        # The verb the reply being read answers, once its first line is in.
        self._answering: bytes | None = None
        # A 227 being collected for the rewrite, or None.
        self._passive_reply: bytearray | None = None
        self._passive_verb: bytes = b""
        self._paused = False
        self._epsv_all = False
        self._long_lines = 0
        self._client_eof = False
        self._closed = False

    @property
    def paused(self) -> bool:
        """True while an ``OpenPassive`` waits for the shell's answer."""
        return self._paused

    # -- input -----------------------------------------------------------

    def receive_data(self, side: Side, data: bytes) -> list[Command]:
        """Take bytes that arrived from ``side``; return what to do now."""
        out: list[Command] = []
        if self._closed:
            return out
        if side is Side.CLIENT:
            self._client_lines.feed(data)
            self._read_commands(out)
        else:
            self._server_lines.feed(data)
            self._read_replies(out)
        return out

    def connection_closed(self, side: Side) -> list[Command]:
        """``side`` closed its control connection (end of file)."""
        out: list[Command] = []
        if self._closed:
            return out
        if side is Side.CLIENT:
            # The client may have half-closed after QUIT and still read the 221:
            # end the session once every command it sent has been answered.
            self._client_eof = True
            self._maybe_finish(out)
        else:
            # After "221 Goodbye" nothing is pending and the close is the
            # normal end; with commands unanswered, the backend died.
            if any(isinstance(entry, _Forwarded) for entry in self._pending):
                out.append(SendTo(Side.CLIENT, _reply("421 Service not available, the server closed the connection.")))
            self._close(out, "backend closed the connection")
        return out

    def passive_opened(self, host: IPv4Address, port: int) -> list[Command]:
        """The shell listens on ``host:port`` for the mapping it was asked for."""
        if not self._paused:
            raise RuntimeError("passive_opened() without a pending OpenPassive")
        if self._passive_verb == b"EPSV":
            return self._resume(format_229(port))
        return self._resume(format_227(host, port))

    def passive_failed(self, reason: str) -> list[Command]:
        """The shell could not open a public port for the pending mapping."""
        if not self._paused:
            raise RuntimeError("passive_failed() without a pending OpenPassive")
        return self._resume(_reply(f"425 Can't open data connection: {reason}."))

    # -- client side -----------------------------------------------------

    def _read_commands(self, out: list[Command]) -> None:
        while not self._closed:
            line = self._client_lines.next_line()
            if line is None:
                return
            if line is TOO_LONG:
                self._long_lines += 1
                limit = self.policy.max_line
                self._answer_locally(out, _reply(f"500 Command line too long (the limit is {limit} bytes)."))
                if self._long_lines >= self.policy.max_long_lines:
                    out.append(Note("too many over-long command lines", level="warning"))
                    self._close(out, "client kept sending over-long lines")
                continue
            self._on_command(line, out)

    def _on_command(self, line: bytes, out: list[Command]) -> None:
        # Telnet IAC sequences (RFC 854) may precede the verb, as ftplib's
        # abort() sends IAC IP IAC DM before ABOR; they are relayed untouched
        # but must not hide the verb.
        verb, argument = split_command(telnet_text(line))
        if not verb:
            self._answer_locally(out, _reply("500 Empty command line."))
            return
        alias = self.policy.aliases.get(verb)
        if alias is not None:
            out.append(Note("command alias", level="debug", fields={"received": verb.decode("latin-1"), "sent": alias.decode("latin-1")}))
            verb = alias
            line = verb + (b" " + argument if argument else b"")
        out.append(Note("command", level="debug", fields={"verb": verb.decode("latin-1"), "argument": "****" if verb in SECRET_VERBS else argument.decode("utf-8", "replace")}))

        if self._epsv_all and verb in REFUSED_AFTER_EPSV_ALL:
            self._answer_locally(out, _reply(f"503 {verb.decode('latin-1')} not allowed after EPSV ALL."))
            return
        if verb == b"USER":
            self.user = argument.decode("utf-8", "replace")
        elif verb == b"EPSV":
            self._on_epsv(argument, out)
            return
        self._forward(verb, line + CRLF, out)

    def _on_epsv(self, argument: bytes, out: list[Command]) -> None:
        # RFC 2428 section 3: "EPSV" or "EPSV <net-prt>" asks for a port,
        # "EPSV ALL" promises only EPSV from now on. ftpfix answers EPSV from a
        # PASV to the backend, which every legacy server knows, so the backend
        # never needs EPSV support of its own.
        selector = argument.strip().upper()
        if selector == b"ALL":
            self._epsv_all = True
            self._answer_locally(out, _reply("200 EPSV ALL command successful."))
        elif selector in (b"", b"1"):
            self._forward(b"EPSV", b"PASV" + CRLF, out)
        else:
            self._answer_locally(out, _reply("522 Network protocol not supported, use (1)"))

    def _forward(self, verb: bytes, data: bytes, out: list[Command]) -> None:
        self._pending.append(_Forwarded(verb))
        out.append(SendTo(Side.SERVER, data))

    def _answer_locally(self, out: list[Command], reply: bytes) -> None:
        if self._pending:
            self._pending.append(_Local(reply))
        else:
            out.append(SendTo(Side.CLIENT, reply))

    # -- server side -----------------------------------------------------

    def _read_replies(self, out: list[Command]) -> None:
        while not self._paused and not self._closed:
            line = self._server_lines.next_line()
            if line is None:
                return
            if line is TOO_LONG:
                raise BackendError(
                    f"backend sent a reply line over {MAX_REPLY_LINE} bytes",
                    reply=_reply("421 Service not available: the server sent an over-long reply."),
                )
            self._on_reply_line(self._framer.classify(line), out)

    def _on_reply_line(self, line: ReplyLine, out: list[Command]) -> None:
        if line.first:
            head = self._pending[0] if self._pending else None
            self._answering = head.verb if isinstance(head, _Forwarded) else None
            if self._answering in PASSIVE_VERBS and line.code == 227:
                self._passive_reply = bytearray()
                self._passive_verb = self._answering
            if line.code >= 200 and self._answering in TRANSFER_VERBS:
                out.append(FinishTransfer())

        if self._passive_reply is not None:
            self._passive_reply += line.raw + CRLF
            if len(self._passive_reply) > MAX_PASSIVE_REPLY:
                raise BackendError(
                    f"backend sent a 227 reply over {MAX_PASSIVE_REPLY} bytes",
                    reply=_reply("421 Service not available: the server sent an over-long reply."),
                )
            if line.last:
                self._on_passive_reply(bytes(self._passive_reply), out)
            return

        out.append(SendTo(Side.CLIENT, line.raw + CRLF))
        if line.last and line.code >= 200:
            self._complete(out)

    def _on_passive_reply(self, text: bytes, out: list[Command]) -> None:
        self._passive_reply = None
        try:
            host, port = parse_227(text)
        except AddressError as error:
            out.append(Note("unusable 227 from the backend", level="warning", fields={"reply": text.decode("latin-1").strip(), "error": str(error)}))
            out.append(SendTo(Side.CLIENT, _reply("425 Can't open data connection: the server's passive reply was unusable.")))
            self._complete(out)
            return
        self._paused = True
        out.append(OpenPassive(advertised_host=str(host), backend_port=port))

    def _resume(self, reply: bytes) -> list[Command]:
        out: list[Command] = [SendTo(Side.CLIENT, reply)]
        self._paused = False
        self._complete(out)
        self._read_replies(out)
        return out

    def _complete(self, out: list[Command]) -> None:
        """The reply to the command at the head of the FIFO is complete."""
        if self._pending and isinstance(self._pending[0], _Forwarded):
            self._pending.popleft()
        while self._pending and isinstance(self._pending[0], _Local):
            out.append(SendTo(Side.CLIENT, self._pending.popleft().reply))  # type: ignore[union-attr]
        self._maybe_finish(out)

    def _maybe_finish(self, out: list[Command]) -> None:
        if self._client_eof and not self._pending:
            self._close(out, "client closed the connection")

    def _close(self, out: list[Command], reason: str) -> None:
        self._closed = True
        out.append(Close(reason))
