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
into PASV) opens a mapping. Three rules keep that pairing true against a
hostile client, which can make a server echo text of its choosing (a file name
in a STAT listing, a 550, a 257) and so forge reply lines:

1. The backend only ever sees canonical command lines (``parse_command``):
   no control bytes, a verb of letters, one space. So ftpfix and the backend
   agree on how many commands were sent, and so on how many replies are due.
2. A reply that answers no command is fatal: the client gets a 421 and the
   session ends. Forged lines that end a reply early leave the rest of the
   real reply with nothing to answer, and are caught here.
3. PASV, EPSV, PORT and EPRT are *exclusive*: sent only when every earlier
   reply is complete and no partial reply line is buffered, and nothing else
   is read from the client until their own reply is complete. After a
   multi-line reply (the only kind in which a server puts client-chosen text
   at the start of a line: a STAT listing) the shell must also confirm that
   the backend has gone quiet (``AwaitQuiet``), so the rest of a reply whose
   end was forged arrives, and is caught by rule 2, before anything new is
   asked. A 227 followed by any further byte opens nothing either, and one
   that names two addresses is refused. A 227 that does answer PASV must
   also name a plausible port (``Policy.backend_passive_ports``): NAT
   slipstreaming aims at the backend host's other services.

When a 227 is complete the session emits ``OpenPassive`` and stops reading
replies until the shell calls ``passive_opened`` (the public port is
listening) or ``passive_failed`` (no port); replies that arrive meanwhile stay
buffered, so the rewritten 227 reaches the client in its place in the stream.

The final 2xx to a transfer command is held the same way: ``FinishTransfer``,
answered by ``transfer_finished`` once the data relay has delivered the last
byte, or failed, in which case the client gets 426 (or 425) in its place. A
4xx or 5xx ends the transfer at once (``CancelTransfer``). While a transfer
command is outstanding, only ABOR goes to the backend (ProFTPD answers other
commands before the transfer's reply). ABOR itself goes to the backend only
while the backend still owes the transfer's reply: with no transfer, or
once the backend has answered, ftpfix answers it (pure-ftpd would not), and
a reply the backend skips is supplied, so the client stays in step.

Everything is bounded: at most ``MAX_PENDING`` commands outstanding, and the
shell stops reading a side while ``wants_data`` is False, so a
flood of lines is held back by TCP rather than buffered here.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType

from .commands import (
    AbortTransfer,
    AwaitQuiet,
    CancelTransfer,
    Close,
    Command,
    FinishTransfer,
    Note,
    OpenActive,
    OpenPassive,
    SendTo,
    Side,
)
from .errors import BackendError
from .grammar import (
    CRLF,
    SEPARATORS,
    AddressError,
    CommandRejected,
    ReplyFramer,
    ReplyLine,
    UnsupportedNetwork,
    format_227,
    format_229,
    format_command,
    format_port,
    parse_227,
    parse_229,
    parse_command,
    parse_eprt,
    parse_port,
    rewrite_feat,
)
from .lines import TOO_LONG, LineBuffer

#: Pseudo-verb of the "command" the backend's greeting answers.
GREETING = b""

#: Commands whose final reply may only go to the client once the data relay has
#: finished (RFC 959 section 4.1.3 lists the ones that use a data connection).
TRANSFER_VERBS = frozenset({b"RETR", b"STOR", b"STOU", b"APPE", b"LIST", b"NLST", b"MLSD"})

#: Client verbs ftpfix answers with a mapping of its own.
PASSIVE_VERBS = frozenset({b"PASV", b"EPSV"})

#: Commands that set up a data connection. They are sent to the backend alone,
#: with no other reply outstanding (see the theory of operation, rule 3).
EXCLUSIVE_VERBS = frozenset({b"PASV", b"EPSV", b"PORT", b"EPRT"})

#: Data-connection setup commands refused after ``EPSV ALL`` (RFC 2428 section 4).
REFUSED_AFTER_EPSV_ALL = frozenset({b"PASV", b"PORT", b"EPRT", b"LPRT", b"LPSV"})

#: Commands ftpfix answers itself with a refusal, and why.
REFUSED = {
    # RFC 4217: after AUTH TLS the control channel is encrypted, and ftpfix
    # could no longer see, let alone rewrite, a single 227.
    b"AUTH": "502 AUTH is not available through this FTP proxy; use plain FTP.",
    # RFC 1639's long forms carry addresses ftpfix does not rewrite.
    b"LPSV": "502 LPSV is not supported; use EPSV or PASV.",
    b"LPRT": "502 LPRT is not supported; use EPRT or PORT.",
}

#: Lowest port an active data connection may go to (RFC 2577 section 3: a
#: PORT to a privileged port is how bounce attacks reach other services).
#: A backend's passive port below it is just as implausible.
PORT_FLOOR = 1024

#: Replies a server gives to ABOR (RFC 959 section 4.1.3: 225 or 226, after the
#: transfer's 426), errors, and 426 itself: ProFTPD in ASCII mode answers
#: the ABOR first and the transfer second.
ABOR_REPLIES = frozenset({225, 226, 421, 426, 450, 451, 500, 501, 502, 503, 504})

#: Backend replies to EPSV that mean "I do not know EPSV" (RFC 959 4.2).
EPSV_UNKNOWN = frozenset({500, 502})

#: Longest reply line accepted from the backend. A directory listing sent on
#: the control channel (STAT) has one file per line, and paths are at most
#: 4096 bytes on Linux, so this leaves room while keeping memory bounded.
MAX_REPLY_LINE = 64 * 1024

#: Longest reply held for rewriting (227, FEAT, a transfer's 226), all lines
#: together. A real 227 is one line of under 100 bytes; pure-ftpd's FEAT is
#: about 300.
MAX_HELD_REPLY = 16 * 1024

#: Commands a client may have outstanding at once. Clients pipeline a handful
#: at most; past this the core reads no more lines, and the shell stops reading
#: the socket once ``CLIENT_BACKLOG`` bytes wait, so a flood of empty lines
#: costs a bounded queue, not memory without end.
MAX_PENDING = 32

#: Unread client bytes the core holds before the shell stops reading.
CLIENT_BACKLOG = 64 * 1024

#: Unread backend bytes the core holds while a reply waits for the shell:
#: room for a full reply line and more.
SERVER_BACKLOG = 2 * MAX_REPLY_LINE

#: Telnet "interrupt process" (RFC 854): IAC IP.
TELNET_IP = b"\xff\xf4"

#: User names of anonymous FTP (RFC 1635).
ANONYMOUS_USERS = frozenset({b"ANONYMOUS", b"FTP"})

#: Commands whose successful reply (230) means the client is logged in.
LOGIN_VERBS = frozenset({b"USER", b"PASS", b"ACCT"})

#: Commands whose argument is never logged.
SECRET_VERBS = frozenset({b"PASS", b"ACCT"})

#: The reply that ends a session whose backend said something out of turn.
OUT_OF_TURN = b"421 Service not available: the server sent a reply to no command." + CRLF


def _default_aliases() -> Mapping[bytes, bytes]:
    return MappingProxyType({b"P@SW": b"PASV"})


@dataclass(frozen=True, slots=True)
class Policy:
    """The parts of the configuration that the core needs.

    ``aliases`` maps upper-cased verbs to the verb the backend receives: the
    default repairs the SMC Barricade's mangling of PASV into P@SW.

    ``epsv`` says what the backend is sent for a client's EPSV: ``translate``
    sends PASV, ``passthrough`` sends EPSV, and ``auto`` sends EPSV until the
    backend refuses it (500 or 502) or leaves it out of FEAT, then PASV.

    ``active`` says what happens to PORT and EPRT: ``proxy`` relays the data
    connection through ftpfix, ``passthrough`` forwards the command to the
    backend once it passes the bounce checks, ``deny`` refuses it.
    ``fix_address`` replaces a private address in PORT or EPRT by the client's
    real one, for clients behind NAT of their own.

    ``deny_anonymous`` refuses USER anonymous and USER ftp without asking the
    backend (pure-ftpd's ``-E``).

    ``backend_port`` is the backend's control port and ``backend_passive_ports``
    its passive range, if known: a 227 or 229 naming any other port opens
    nothing.
    """

    aliases: Mapping[bytes, bytes] = field(default_factory=_default_aliases)
    max_line: int = 4096
    max_long_lines: int = 3
    epsv: str = "auto"
    active: str = "proxy"
    fix_address: bool = True
    deny_anonymous: bool = False
    backend_port: int = 21
    backend_passive_ports: range | None = None


class _Action(enum.Enum):
    """What to do with the reply being read."""

    RELAY = "relay"  # pass it to the client line by line
    PASSIVE = "passive"  # hold the 227 or 229 and open a mapping
    FEAT = "feat"  # hold the feature list and rewrite it
    FALLBACK = "fallback"  # swallow the backend's "EPSV unknown", send PASV
    TRANSFER = "transfer"  # hold a transfer's 2xx until the relay has finished


class Waiting(enum.Enum):
    """What the core waits for from the shell before it reads on."""

    NOTHING = "nothing"
    PASSIVE = "passive"  # OpenPassive: replies are not read
    TRANSFER = "transfer"  # FinishTransfer: replies are not read
    ACTIVE = "active"  # OpenActive: commands are not read


@dataclass(slots=True)
class _Forwarded:
    verb: bytes  # as the client meant it (after aliases)
    sent: bytes = b""  # the verb the backend was sent, when it differs


@dataclass(slots=True)
class _Local:
    reply: bytes


def _reply(text: str) -> bytes:
    return text.encode("ascii", "replace") + CRLF


class Session:
    """One client's control connection and its backend's, as a state machine.

    Feed it with ``receive_data`` and ``connection_closed``; answer its
    ``OpenPassive`` with ``passive_opened`` or ``passive_failed``, its
    ``OpenActive`` with ``active_opened`` or ``active_failed``, and its
    ``FinishTransfer`` with ``transfer_finished``.
    """

    def __init__(self, policy: Policy | None = None, client: IPv4Address | IPv6Address | None = None) -> None:
        self.policy = policy if policy is not None else Policy()
        #: The client's address, as its control connection comes from; None
        #: when unknown, and then every PORT and EPRT is refused.
        self.client = client
        self.user: str | None = None
        #: True once the backend has accepted the login (230).
        self.logged_in = False
        self._client_lines = LineBuffer(self.policy.max_line)
        self._server_lines = LineBuffer(MAX_REPLY_LINE)
        self._framer = ReplyFramer()
        self._pending: deque[_Forwarded | _Local] = deque([_Forwarded(GREETING)])
        self._waiting = Waiting.NOTHING
        # An exclusive command read while earlier replies were outstanding.
        self._deferred: tuple[bytes, bytes] | None = None
        # The command the reply being read answers, and what to do with it.
        self._answering: _Forwarded | None = None
        self._action = _Action.RELAY
        self._held: list[bytes] = []
        self._held_size = 0
        # Set when a multi-line reply completes, until the shell confirms that
        # the backend went quiet after it (rule 3).
        self._unsettled = False
        self._quiet_asked = False
        self._reply_multiline = False
        self._epsv_all = False
        self._backend_knows_epsv = True
        self._long_lines = 0
        self._client_eof = False
        self._closed = False

    @property
    def partial_command(self) -> bool:
        """True while the client has sent part of a command line."""
        return self._client_lines.partial > 0

    @property
    def paused(self) -> bool:
        """True while the core waits for the shell's answer to a command."""
        return self._waiting is not Waiting.NOTHING

    @property
    def waiting_for(self) -> Waiting:
        """What the core waits for from the shell."""
        return self._waiting

    def wants_data(self, side: Side) -> bool:
        """False while ``side``'s unread input is at its bound: stop reading it.

        The client's input waits while commands are held back (an exclusive
        command, ``MAX_PENDING``); the backend's while a reply is held for
        the shell. Either peer then meets TCP backpressure.
        """
        if side is Side.CLIENT:
            return not self._closed and self._client_lines.pending < CLIENT_BACKLOG
        return not self._closed and self._server_lines.pending < SERVER_BACKLOG

    @property
    def idle(self) -> bool:
        """True when no command is outstanding: nothing would be cut short by a 421."""
        return not self._pending and self._deferred is None and not self.paused

    @property
    def can_advance(self) -> bool:
        """True if buffered client lines could be read now: call ``advance``."""
        if not self._reading_commands():
            return False
        if self._deferred is not None:
            return self._held_back(self._deferred[0]) is None
        return self._client_lines.has_line

    # -- input -----------------------------------------------------------

    def advance(self) -> list[Command]:
        """Read on from what is buffered (see ``can_advance``); return what to do."""
        out: list[Command] = []
        if not self._closed:
            self._advance(out)
        return out

    def receive_data(self, side: Side, data: bytes) -> list[Command]:
        """Take bytes that arrived from ``side``; return what to do now."""
        out: list[Command] = []
        if self._closed:
            return out
        (self._client_lines if side is Side.CLIENT else self._server_lines).feed(data)
        self._advance(out)
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
            self._advance(out)
        else:
            # After "221 Goodbye" nothing is pending and the close is the
            # normal end; with commands unanswered, the backend died.
            if any(isinstance(entry, _Forwarded) for entry in self._pending):
                out.append(SendTo(Side.CLIENT, _reply("421 Service not available, the server closed the connection.")))
            self._close(out, "backend closed the connection")
        return out

    def passive_opened(self, host: IPv4Address | None, port: int) -> list[Command]:
        """The shell listens on ``host:port`` for the mapping it was asked for.

        ``host`` may be None only for an extended (EPSV) request.
        """
        self._expect(Waiting.PASSIVE, "passive_opened")
        assert self._answering is not None
        if self._answering.verb == b"EPSV":
            return self._resume(format_229(port))
        if host is None:
            raise RuntimeError("passive_opened() needs an address for a 227")
        return self._resume(format_227(host, port))

    def passive_failed(self, reason: str) -> list[Command]:
        """The shell could not open a public port for the pending mapping."""
        self._expect(Waiting.PASSIVE, "passive_failed")
        return self._resume(_reply(f"425 Can't open data connection: {reason}."))

    def active_opened(self, host: IPv4Address | IPv6Address, port: int) -> list[Command]:
        """The shell listens on ``host:port`` for the backend's data connection."""
        self._expect(Waiting.ACTIVE, "active_opened")
        assert self._deferred is not None
        verb = self._deferred[0]
        self._deferred, self._waiting = None, Waiting.NOTHING
        out: list[Command] = []
        self._forward(verb, format_port(host, port), out)
        self._advance(out)
        return out

    def active_failed(self, reason: str) -> list[Command]:
        """The shell could not listen for the pending active data connection."""
        self._expect(Waiting.ACTIVE, "active_failed")
        self._deferred, self._waiting = None, Waiting.NOTHING
        out: list[Command] = []
        self._answer_locally(out, _reply(f"425 Can't open data connection: {reason}."))
        self._advance(out)
        return out

    def transfer_finished(self, failure: str | None = None, *, connected: bool = True) -> list[Command]:
        """The data relay of the transfer whose 2xx is held has ended.

        ``failure`` says why it did not deliver everything (a reset, a stall,
        an abort), and ``connected`` whether a data connection was made at all.
        """
        self._expect(Waiting.TRANSFER, "transfer_finished")
        held, self._held, self._held_size = self._held, [], 0
        if failure is None:
            return self._resume(CRLF.join(held) + CRLF)
        if not connected:
            return self._resume(_reply(f"425 Can't open data connection: {failure}."))
        return self._resume(_reply(f"426 Connection closed; transfer aborted: {failure}."))

    def _expect(self, waiting: Waiting, name: str) -> None:
        if self._waiting is not waiting:
            raise RuntimeError(f"{name}() while the core waits for {self._waiting.value}")

    def _advance(self, out: list[Command]) -> None:
        """Read what both sides sent, as far as the state allows."""
        self._read_replies(out)
        self._read_commands(out)
        if self._client_eof and not self._closed and not self._pending and self._deferred is None and not self._client_lines.has_line:
            self._close(out, "client closed the connection")

    # -- client side -----------------------------------------------------

    def _reading_commands(self) -> bool:
        if self._closed or self._waiting is Waiting.ACTIVE or len(self._pending) >= MAX_PENDING:
            return False
        # An exclusive command is alone on the wire until its reply is complete.
        last = self._pending[-1] if self._pending else None
        return not (isinstance(last, _Forwarded) and last.verb in EXCLUSIVE_VERBS)

    def _quiet(self) -> bool:
        """True when no reply is outstanding and no reply line is half read."""
        return not self._pending and self._server_lines.pending == 0

    def quiet_confirmed(self) -> list[Command]:
        """The shell's answer to ``AwaitQuiet``: the backend has sent nothing for a while."""
        if not self._quiet_asked:
            raise RuntimeError("quiet_confirmed() without a pending AwaitQuiet")
        self._quiet_asked = False
        self._unsettled = False
        return self.advance()

    def _read_commands(self, out: list[Command]) -> None:
        # At most MAX_PENDING lines per call, so a flood of lines that ftpfix
        # answers itself turns into bounded batches of replies, each written
        # (and pushed back by the client's TCP window) before the next.
        budget = MAX_PENDING
        while budget and self._reading_commands():
            budget -= 1
            if self._deferred is not None:
                match self._held_back(self._deferred[0]):
                    case None:
                        command, self._deferred = self._deferred, None
                        self._on_command(*command, out)
                        continue
                    case "quiet" if not self._quiet_asked:
                        self._quiet_asked = True
                        out.append(AwaitQuiet())
                return
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
            try:
                verb, argument = parse_command(line, self.policy.aliases)
            except CommandRejected as rejected:
                out.append(Note("command refused", level="debug", fields={"why": str(rejected), "length": len(line)}))
                self._answer_locally(out, rejected.reply)
                continue
            alias = self.policy.aliases.get(verb)
            if alias is not None:
                out.append(Note("command alias", level="debug", fields={"received": verb.decode("latin-1"), "sent": alias.decode("latin-1")}))
                verb = alias
            if self._held_back(verb) is not None:
                self._deferred = (verb, argument)
                continue
            self._on_command(verb, argument, out)

    def _held_back(self, verb: bytes) -> str | None:
        """Why ``verb`` may not go out yet, or None.

        Exclusive commands wait for a quiet stream (rule 3). Anything but ABOR
        waits while a transfer command is outstanding: some servers (ProFTPD)
        answer a command sent during a transfer before the transfer's own
        final reply, and replies out of order are replies paired wrongly.
        """
        if verb in EXCLUSIVE_VERBS:
            if not self._quiet():
                return "replies outstanding"
            if self._unsettled:
                return "quiet"
            return None
        if verb != b"ABOR" and self._transfer_outstanding():
            return "transfer running"
        return None

    def _transfer_outstanding(self) -> bool:
        return any(isinstance(entry, _Forwarded) and entry.verb in TRANSFER_VERBS for entry in self._pending)

    def _on_command(self, verb: bytes, argument: bytes, out: list[Command]) -> None:
        shown = "****" if verb in SECRET_VERBS else argument.decode("utf-8", "replace")
        out.append(Note("command", level="debug", fields={"verb": verb.decode("ascii"), "argument": shown}))
        if self._epsv_all and verb in REFUSED_AFTER_EPSV_ALL:
            self._answer_locally(out, _reply(f"503 {verb.decode('ascii')} not allowed after EPSV ALL."))
            return
        if verb in REFUSED:
            self._answer_locally(out, _reply(REFUSED[verb]))
            return
        match verb:
            case b"USER":
                name = argument.strip(SEPARATORS)
                if self.policy.deny_anonymous and name.upper() in ANONYMOUS_USERS:
                    out.append(Note("anonymous login refused", level="warning"))
                    self._answer_locally(out, _reply("530 Anonymous logins are not allowed here."))
                    return
                self.user = name.decode("utf-8", "replace")
            case b"PASV" if isinstance(self.client, IPv6Address):
                self._answer_locally(out, _reply("425 Can't open data connection: a 227 cannot carry an IPv6 address, use EPSV."))
                return
            case b"EPSV":
                self._on_epsv(argument, out)
                return
            case b"PORT" | b"EPRT":
                self._on_active(verb, argument, out)
                return
            case b"ABOR":
                self._abort(out)
                return
        self._forward(verb, format_command(verb, argument), out)

    def _abort(self, out: list[Command]) -> None:
        if not self._transfer_outstanding():
            # Nothing to abort. pure-ftpd never answers an ABOR it does not
            # need, and the reply it owes would shift every later pairing.
            self._answer_locally(out, _reply("225 No transfer to abort."))
            return
        if self._waiting is Waiting.TRANSFER:
            # The backend has answered already (its 2xx waits for the relay):
            # for it the transfer is over, and whether it answers an ABOR now
            # depends on the server. Cut the relay here; the held 2xx turns
            # into a 426 if the data was not all delivered.
            out.append(AbortTransfer())
            self._answer_locally(out, _reply("226 Abort successful."))
            return
        # RFC 959 section 4.1.3: Telnet IP, then the synch (IAC DM as TCP
        # urgent data), then ABOR. Clients send it in different ways, and the
        # urgent mark does not survive ftpfix, so send the canonical form:
        # vsftpd notices an ABOR during a transfer only through SIGURG.
        self._pending.append(_Forwarded(b"ABOR"))
        out.append(SendTo(Side.SERVER, TELNET_IP + b"\xff"))
        out.append(SendTo(Side.SERVER, b"\xf2", urgent=True))
        out.append(SendTo(Side.SERVER, b"ABOR" + CRLF))
        # After the ABOR is on its way, so the backend reads it while its
        # data connection is still whole.
        out.append(AbortTransfer())

    def _on_epsv(self, argument: bytes, out: list[Command]) -> None:
        # RFC 2428 section 3: "EPSV" or "EPSV <net-prt>" asks for a port,
        # "EPSV ALL" promises only EPSV from now on. The data port is on the
        # control connection's address, so only that protocol can be served.
        selector = argument.strip(SEPARATORS).upper()
        family = b"2" if isinstance(self.client, IPv6Address) else b"1"
        if selector == b"ALL":
            self._epsv_all = True
            self._answer_locally(out, _reply("200 EPSV ALL command successful."))
            return
        if selector not in (b"", family):
            self._answer_locally(out, _reply(f"522 Network protocol not supported, use ({family.decode()})"))
            return
        # A legacy backend may not know EPSV; every one knows PASV, and the
        # 229 the client gets carries no address, so either will do.
        mode = self.policy.epsv
        send_epsv = mode == "passthrough" or (mode == "auto" and self._backend_knows_epsv)
        sent = b"EPSV" if send_epsv else b"PASV"
        self._pending.append(_Forwarded(b"EPSV", sent))
        out.append(SendTo(Side.SERVER, sent + CRLF))

    def _on_active(self, verb: bytes, argument: bytes, out: list[Command]) -> None:
        name = verb.decode("ascii")
        if self.policy.active == "deny":
            self._answer_locally(out, _reply(f"502 {name} is disabled here; use passive mode (PASV or EPSV)."))
            return
        try:
            host, port = parse_port(argument) if verb == b"PORT" else parse_eprt(argument)
        except UnsupportedNetwork:
            self._answer_locally(out, _reply("522 Network protocol not supported, use (1,2)"))
            return
        except AddressError as error:
            self._answer_locally(out, _reply(f"501 Syntax error in {name}: {error}."))
            return
        # Bounce protection, RFC 2577 section 3: data goes only to the client
        # itself, and never to a privileged port.
        if port < PORT_FLOOR:
            out.append(Note("active mode to a privileged port refused", level="warning", fields={"target": f"{host}:{port}"}))
            self._answer_locally(out, _reply(f"504 {name} refused: port {port} is below {PORT_FLOOR}."))
            return
        if host != self.client:
            if self.client is not None and self.policy.fix_address and (host.is_private or host.is_unspecified):
                # A client behind its own NAT names its private address.
                out.append(Note("active mode address fixed", fields={"sent": str(host), "used": str(self.client)}))
                host = self.client
            else:
                out.append(Note("active mode to another address refused", level="warning", fields={"target": f"{host}:{port}"}))
                self._answer_locally(out, _reply(f"501 {name} refused: the address must be your own ({self.client})."))
                return
        if self.policy.active == "passthrough":
            # The backend gets the checked address, re-serialised: never the
            # client's own line, which may name another host.
            self._forward(verb, format_port(host, port), out)
            return
        self._waiting = Waiting.ACTIVE
        self._deferred = (verb, argument)
        out.append(OpenActive(host=str(host), port=port))

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
        while self._waiting in (Waiting.NOTHING, Waiting.ACTIVE) and not self._closed:
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
            if isinstance(head, _Forwarded) and head.verb == b"ABOR" and line.code not in ABOR_REPLIES:
                # The server did not answer the ABOR (pure-ftpd, when the
                # transfer ended just before it): this reply is the next
                # command's. Answer the ABOR for it, so the client stays in step.
                out.append(Note("the server did not answer ABOR", fields={"next_reply": line.code}))
                self._pending.popleft()
                out.append(SendTo(Side.CLIENT, _reply("226 Abort successful.")))
                while self._pending and isinstance(self._pending[0], _Local):
                    out.append(SendTo(Side.CLIENT, self._pending.popleft().reply))  # type: ignore[union-attr]
                head = self._pending[0] if self._pending else None
            if not isinstance(head, _Forwarded):
                self._out_of_turn(line, out)
                return
            self._answering = head
            self._reply_multiline = not line.last
            self._action = self._choose_action(line.code)
            if head.verb in TRANSFER_VERBS and line.code >= 300:
                # Refused or failed: the data connection has nothing more to carry.
                out.append(CancelTransfer())

        if self._action is _Action.RELAY:
            out.append(SendTo(Side.CLIENT, line.raw + CRLF))
            if line.last and line.code >= 200:
                if line.code == 230 and self._answering is not None and self._answering.verb in LOGIN_VERBS:
                    self.logged_in = True
                self._complete(out)
            return

        self._held.append(line.raw)
        self._held_size += len(line.raw) + 2
        if self._held_size > MAX_HELD_REPLY:
            raise BackendError(
                f"backend sent a {line.code} reply over {MAX_HELD_REPLY} bytes",
                reply=_reply("421 Service not available: the server sent an over-long reply."),
            )
        if not line.last:
            return
        match self._action:
            case _Action.TRANSFER:
                self._waiting = Waiting.TRANSFER
                out.append(FinishTransfer())
                return
        held, self._held, self._held_size = self._held, [], 0
        match self._action:
            case _Action.PASSIVE:
                self._on_passive_reply(line.code, CRLF.join(held) + CRLF, out)
            case _Action.FEAT:
                lines, knows_epsv = rewrite_feat(held)
                self._backend_knows_epsv = knows_epsv
                out.append(SendTo(Side.CLIENT, b"".join(held_line + CRLF for held_line in lines)))
                self._complete(out)
            case _Action.FALLBACK:
                out.append(Note("backend does not know EPSV; sending PASV", fields={"reply": held[0].decode("latin-1")}))
                self._backend_knows_epsv = False
                assert self._answering is not None
                self._answering.sent = b"PASV"
                out.append(SendTo(Side.SERVER, b"PASV" + CRLF))

    def _out_of_turn(self, line: ReplyLine, out: list[Command]) -> None:
        """A reply starts while no command awaits one (rule 2)."""
        text = line.raw[:200].decode("latin-1")
        if line.code == 421:
            # RFC 959 section 4.2: the one reply a server may send unasked,
            # as it closes the connection (an idle timeout, a shutdown).
            out.append(Note("backend ended the session", fields={"reply": text}))
            out.append(SendTo(Side.CLIENT, line.raw + CRLF))
            self._close(out, "backend sent 421")
            return
        out.append(Note("backend reply answers no command; ending the session", level="warning", fields={"reply": text}))
        out.append(SendTo(Side.CLIENT, OUT_OF_TURN))
        self._close(out, "backend reply answered no command")

    def _choose_action(self, code: int) -> _Action:
        answering = self._answering
        assert answering is not None
        # By reply code, not by the command sent: some servers answer EPSV
        # with a 227, and a 229 is as good as a 227 for ftpfix.
        if answering.verb in PASSIVE_VERBS and code in (227, 229):
            return _Action.PASSIVE
        if answering.sent == b"EPSV" and code in EPSV_UNKNOWN and self.policy.epsv == "auto":
            return _Action.FALLBACK
        if answering.verb == b"FEAT" and code == 211:
            return _Action.FEAT
        if answering.verb in TRANSFER_VERBS and 200 <= code < 300:
            return _Action.TRANSFER
        return _Action.RELAY

    def _on_passive_reply(self, code: int, text: bytes, out: list[Command]) -> None:
        try:
            if code == 227:
                host, port = parse_227(text)
                advertised = str(host)
            else:
                port, advertised = parse_229(text), ""
            self._check_passive_port(port)
        except ValueError as error:
            out.append(Note(f"unusable {code} from the backend", level="warning", fields={"reply": text.decode("latin-1").strip(), "error": str(error)}))
            out.append(SendTo(Side.CLIENT, _reply("425 Can't open data connection: the server's passive reply was unusable.")))
            self._complete(out)
            return
        if self._server_lines.pending:
            # Nothing else is outstanding (rule 3): whatever follows the 227
            # answers no command, and the 227 may be forged too.
            out.append(Note("backend sent more after its 227; ending the session", level="warning", fields={"after": self._server_lines.head(200).decode("latin-1")}))
            out.append(SendTo(Side.CLIENT, OUT_OF_TURN))
            self._close(out, "backend reply answered no command")
            return
        self._waiting = Waiting.PASSIVE
        assert self._answering is not None
        out.append(OpenPassive(advertised_host=advertised, backend_port=port, extended=self._answering.verb == b"EPSV"))

    def _check_passive_port(self, port: int) -> None:
        """Raise AddressError for a port no backend would offer for PASV.

        NAT slipstreaming aims a forged 227 at another service of the backend
        host (SSH, a database, the FTP port itself): a privileged port, the
        control port, or one outside the backend's known passive range.
        """
        if port < PORT_FLOOR:
            raise AddressError(f"port {port} is privileged")
        if port == self.policy.backend_port:
            raise AddressError(f"port {port} is the server's control port")
        ports = self.policy.backend_passive_ports
        if ports is not None and port not in ports:
            raise AddressError(f"port {port} is outside the server's passive ports {ports.start}-{ports.stop - 1}")

    def _resume(self, reply: bytes) -> list[Command]:
        out: list[Command] = [SendTo(Side.CLIENT, reply)]
        self._waiting = Waiting.NOTHING
        self._complete(out)
        self._advance(out)
        return out

    def _complete(self, out: list[Command]) -> None:
        """The reply to the command at the head of the FIFO is complete."""
        if self._pending and isinstance(self._pending[0], _Forwarded):
            self._pending.popleft()
            if self._reply_multiline:
                self._unsettled = True
        while self._pending and isinstance(self._pending[0], _Local):
            out.append(SendTo(Side.CLIENT, self._pending.popleft().reply))  # type: ignore[union-attr]

    def _close(self, out: list[Command], reason: str) -> None:
        self._closed = True
        out.append(Close(reason))
