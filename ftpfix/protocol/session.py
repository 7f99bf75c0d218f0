"""The control-channel state machine of one proxied FTP session.

Theory of operation
-------------------
ftpfix relays a client's control connection to one backend connection.
Everything that happens goes in through ``Session.receive(event)``
(``ftpfix.protocol.events``): bytes from either side, a side's end, and the
outcome of something the core asked for. A list of commands
(``ftpfix.protocol.commands``) comes out, for the shell to execute in order.

FTP is strictly request/reply (RFC 959 section 4.2): every command gets exactly
one final reply (codes 2xx to 5xx), perhaps after preliminary ones (1xx), and
replies come back in the order the commands were sent. The session keeps that
order in one FIFO, ``_pending``:

- A command relayed to the backend appends a ``_Forwarded`` entry, popped when
  its final reply comes back. The backend's greeting is the answer to a
  pseudo-command that the connection itself sends.
- A command that ftpfix answers itself (an empty line, an over-long line,
  ``EPSV 2``, an ABOR) appends a ``_Local`` entry with the reply. It is sent
  only when every command before it has been answered, so a client that
  pipelines still reads its replies in order.

What each special verb means (PASV, EPSV, PORT, EPRT, ABOR, FEAT, USER, ...) is
in ``verbs.py``, in one table each way; this module keeps the FIFO, the
holds and the closing.

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

The core waits for the shell in named states (``Waiting``, with the allowed
moves in ``TRANSITIONS``, in the manner of h11's ``_state.py``):

- ``PASSIVE``: a complete 227 or 229 became ``OpenPassive``; replies are not
  read until ``PassiveOpened`` or ``PassiveFailed``, so the rewritten reply
  reaches the client in its place in the stream.
- ``ACTIVE``: a PORT or EPRT became ``OpenActive``; commands are not read
  until ``ActiveOpened`` or ``ActiveFailed``.
- ``TRANSFER``: the backend's 2xx to a transfer command is held
  (``FinishTransfer``) until ``TransferDone`` says the data relay has
  delivered the last byte, or failed, in which case the client gets 426 (or
  425) in its place. A 4xx or 5xx ends the transfer at once
  (``CancelTransfer``). While a transfer command is outstanding only ABOR is
  read on (ProFTPD answers other commands before the transfer's reply).
- ``QUIET``: ``AwaitQuiet`` was asked (rule 3); ``BackendQuiet`` ends it.
- ``CLOSED``: the session is over; nothing more comes out.

Everything is bounded: at most ``MAX_PENDING`` commands outstanding, and the
shell stops reading a side while ``wants_data`` is False, so a flood of lines
is held back by TCP rather than buffered here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .commands import (
    AwaitQuiet,
    CancelTransfer,
    Close,
    Command,
    Count,
    FinishTransfer,
    Level,
    Note,
    OpenActive,
    OpenPassive,
    SendTo,
    SettleTransfer,
    Side,
    StartTLS,
    Tally,
    TransferReplied,
)
from .errors import BackendError
from .events import (
    ActiveFailed,
    ActiveOpened,
    BackendQuiet,
    ConnectionClosed,
    DataFailed,
    DataReceived,
    Event,
    PassiveFailed,
    PassiveOpened,
    ReadOn,
    TlsStarted,
    TransferDone,
    TransferSettled,
)
from .grammar import (
    ABORT_DONE,
    BACKEND_GONE,
    CRLF,
    OUT_OF_TURN,
    OVERLONG_REPLY,
    AddressError,
    CommandRejected,
    ReplyFramer,
    ReplyLine,
    cant_open,
    format_227,
    format_229,
    format_command,
    format_port,
    parse_227,
    parse_229,
    parse_command,
    reply,
    rewrite_feat,
    transfer_aborted,
)
from .lines import TOO_LONG, LineBuffer
from .logins import LOGIN_VERBS, loggable, login_outcome
from .policy import Policy, TlsMode
from .proxyheader import V2_SIGNATURE, looks_like_header
from .state import TRANSITIONS, Waiting
from .verbs import (
    ABOR_REPLIES,
    COMMANDS,
    EXCLUSIVE_VERBS,
    PORT_FLOOR,
    REFUSED_AFTER_EPSV_ALL,
    SECRET_VERBS,
    TRANSFER_VERBS,
    Action,
    abort_now,
    reply_action,
)

#: Pseudo-verb of the "command" the backend's greeting answers.
GREETING = b""

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

#: Longest command argument in a DEBUG line, in characters after escaping.
MAX_LOGGED_ARGUMENT = 256

#: Unread client bytes the core holds before the shell stops reading.
CLIENT_BACKLOG = 64 * 1024

#: Unread backend bytes the core holds while a reply waits for the shell:
#: room for a full reply line and more.
SERVER_BACKLOG = 2 * MAX_REPLY_LINE


#: The event that ends each state, and so may only arrive in it.
_ANSWERS: dict[type, Waiting] = {
    PassiveOpened: Waiting.PASSIVE,
    PassiveFailed: Waiting.PASSIVE,
    ActiveOpened: Waiting.ACTIVE,
    ActiveFailed: Waiting.ACTIVE,
    TransferDone: Waiting.TRANSFER,
    BackendQuiet: Waiting.QUIET,
    TlsStarted: Waiting.TLS,
}


@dataclass(slots=True)
class _Forwarded:
    verb: bytes  # as the client meant it (after aliases)
    sent: bytes = b""  # the verb the backend was sent, when it differs
    aborted: bool = False  # a transfer command the client has sent ABOR for
    preliminaries: int = 0  # 1xx replies to this (transfer) command so far
    probed: bool = False  # ftpfix asked the backend a NOOP: is this reply ever coming?
    probe: bool = False  # ftpfix's own NOOP, whose reply the client never sees
    user: str | None = None  # USER, PASS, ACCT: the user name the backend pairs it with
    failed: str | None = None  # why its data connection was never made (DataFailed)
    argument: bytes = b""  # a transfer command's path, for the transfer log

    def replacement(self) -> bytes:
        """The reply the client gets instead of the server's failure (or its silence)."""
        if self.failed is not None and not self.aborted:
            return cant_open(self.failed)
        return transfer_aborted("aborted" if self.aborted else "the server sent no final reply")


@dataclass(slots=True)
class _Local:
    reply: bytes
    # Sent instead when the client has not logged in by the time the reply's
    # turn comes: a pipelined USER and PASS before it may still log it in.
    logged_out: bytes | None = None


class Session:
    """One client's control connection and its backend's, as a state machine.

    Feed it every event with ``receive``; execute the commands it returns in
    order. While ``can_advance`` is True after that, send ``ReadOn``.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        client: IPv4Address | IPv6Address | None = None,
        *,
        implicit_tls: bool = False,
        greeted: bool = False,
    ) -> None:
        self.policy = policy if policy is not None else Policy()
        #: The client's address, as its control connection comes from; None
        #: when unknown, and then every PORT and EPRT is refused.
        self.client = client
        #: True when ftpfix has already sent the client a 220 of its own (a
        #: balancer that sends the PROXY header only with the client's first
        #: bytes, ``ftpfix.net.proxied``): the backend's greeting is then not
        #: relayed, unless it refuses the session (4xx, 5xx).
        self.greeted = greeted
        self.user: str | None = None
        #: True once the backend has accepted the login (230).
        self.logged_in = False
        #: True after EPSV ALL (RFC 2428 section 4).
        self.epsv_all = False
        #: False once the backend refused EPSV or left it out of FEAT.
        self.backend_knows_epsv = True
        #: True once an ABOR acted ahead of its turn; it is answered in its turn.
        self.abort_acted = False
        #: True while data connections go through ftpfix (PASV, EPSV, PORT
        #: in proxy mode), False after a PORT passed through to the backend.
        self.relaying = False
        #: Why the newest mapping's data connection will never be made
        #: (``DataFailed`` before its transfer command); None once a new
        #: mapping opens. A transfer command meanwhile gets 425 from ftpfix.
        self.data_lost: str | None = None
        #: True once a QUIT was answered: the session ends as the client asked.
        self.quit = False
        #: True once the client's control connection is TLS (AUTH TLS, RFC 4217),
        #: or from the start on the implicit FTPS port.
        self.tls_active = implicit_tls
        #: True after PBSZ (RFC 4217 section 8: PROT needs it first).
        self.pbsz = implicit_tls
        #: True after PROT P: data connections are TLS too. Implicit FTPS
        #: protects them from the start, as its clients expect (curl, lftp,
        #: FileZilla assume PROT P on port 990; they may still send PBSZ and
        #: PROT, and PROT C is honoured).
        self.protected = implicit_tls
        #: The verb the client's last PASV arrived as: b"PASV", or the alias
        #: it was repaired from (b"P@SW", the SMC Barricade's mangling); None
        #: before the first. ``SITE FTPFIX`` tells a diagnosing client.
        self.pasv_received: bytes | None = None
        self._state = Waiting.NOTHING
        self._client_lines = LineBuffer(self.policy.max_line)
        self._server_lines = LineBuffer(MAX_REPLY_LINE)
        self._framer = ReplyFramer()
        self._pending: deque[_Forwarded | _Local] = deque([_Forwarded(GREETING)])
        # An exclusive command read while it could not go out yet, or the
        # PORT or EPRT whose listener the shell is opening (ACTIVE).
        self._deferred: tuple[bytes, bytes] | None = None
        # The command the reply being read answers, and what to do with it.
        self._answering: _Forwarded | None = None
        self._action = Action.RELAY
        self._held: list[bytes] = []
        self._held_size = 0
        self._reply_multiline = False
        # Set when a multi-line reply completes, until the shell confirms that
        # the backend went quiet after it (rule 3).
        self._unsettled = False
        self._long_lines = 0
        self._client_eof = False
        # The client's first bytes, until they are known not to start a PROXY
        # protocol header (None then). A header here was not read by the
        # shell, so it comes from a peer that is not trusted, or proxy_protocol
        # is off: it is refused, never believed. No command is read meanwhile,
        # so the empty lines that open the v2 signature are not answered.
        self._opening: bytes | None = b""

    # -- what the shell may ask ---------------------------------------------

    @property
    def waiting_for(self) -> Waiting:
        """What the core waits for from the shell."""
        return self._state

    @property
    def paused(self) -> bool:
        """True while the core waits for the shell's answer to a command."""
        return self._state not in (Waiting.NOTHING, Waiting.CLOSED)

    @property
    def partial_command(self) -> bool:
        """True while the client has sent part of a command line."""
        return self._client_lines.partial > 0

    def wants_data(self, side: Side) -> bool:
        """False while ``side``'s unread input is at its bound: stop reading it.

        The client's input waits while commands are held back (an exclusive
        command, ``MAX_PENDING``); the backend's while a reply is held for
        the shell. Either peer then meets TCP backpressure.
        """
        if self._state is Waiting.CLOSED:
            return False
        if side is Side.CLIENT:
            return self._client_lines.pending < CLIENT_BACKLOG
        return self._server_lines.pending < SERVER_BACKLOG

    @property
    def quitting(self) -> bool:
        """True once the client has sent QUIT: an end of file after it is a
        client that still reads its replies (the transfer's, then the 221),
        not one that hung up."""
        if any(isinstance(entry, _Forwarded) and entry.verb == b"QUIT" for entry in self._pending):
            return True
        if self._deferred is not None and self._deferred[0] == b"QUIT":
            return True
        for line in self._client_lines.complete_lines():
            try:
                verb, _ = parse_command(line, self.policy.aliases)
            except CommandRejected:
                continue
            if verb == b"QUIT":
                return True
        return False

    @property
    def idle(self) -> bool:
        """True when no command is outstanding: nothing would be cut short by a 421.

        A greeting the backend has not sent yet is no command of the client's:
        a 421 may take its place (RFC 959 allows 421 as the greeting).
        """
        outstanding = len(self._pending)
        if outstanding and isinstance(self._pending[0], _Forwarded) and self._pending[0].verb == GREETING:
            outstanding -= 1
        return not outstanding and self._deferred is None and not self.paused

    @property
    def can_advance(self) -> bool:
        """True if buffered client lines could be read now: send ``ReadOn``."""
        if not self._reading_commands():
            return False
        if self._deferred is not None:
            return self._held_back(self._deferred[0]) is None
        return self._client_lines.has_line

    # -- the one entry point -------------------------------------------------

    def receive(self, event: Event) -> list[Command]:
        """Take one event; return what the shell must do, in order."""
        out: list[Command] = []
        if self._state is Waiting.CLOSED:
            return out
        expected = _ANSWERS.get(type(event))
        if expected is not None and self._state is not expected:
            raise RuntimeError(f"{type(event).__name__} while the core waits for {self._state.value}")
        match event:
            case DataReceived(side=Side.CLIENT, data=data):
                self._client_lines.feed(data)
                if self._opening is not None and self._refuse_proxy_header(data, out):
                    return out
            case DataReceived(side=Side.SERVER, data=data):
                self._server_lines.feed(data)
            case ConnectionClosed(side=Side.CLIENT):
                # The client may have half-closed after QUIT and still read the
                # 221: the session ends once every command has been answered
                # (the shell allows a few seconds for it). But a transfer
                # cannot reach a client that is gone: end it now, so neither
                # the session nor its per-address slot outlives the client.
                self._client_eof = True
                self._opening = None
                if not self.quitting and (self.transfer_outstanding() or self._state is Waiting.TRANSFER):
                    self._close(out, "client hung up")
                    return out
            case ConnectionClosed(side=Side.SERVER):
                # After "221 Goodbye" nothing is pending and the close is the
                # normal end; with commands unanswered, the backend died.
                if any(isinstance(entry, _Forwarded) for entry in self._pending):
                    out.append(SendTo(Side.CLIENT, BACKEND_GONE))
                self._close(out, "quit" if self.quit else "backend closed")
                return out
            case PassiveOpened(host=host, port=port):
                assert self._answering is not None
                self.relaying = True
                self.data_lost = None
                if self._answering.verb == b"EPSV":
                    out.append(Count(Tally.REWRITE_229))
                    self._resume(format_229(port), out)
                elif host is None:
                    raise RuntimeError("PassiveOpened needs an address for a 227")
                else:
                    out.append(Count(Tally.REWRITE_227))
                    self._resume(format_227(host, port), out)
            case PassiveFailed(reason=reason):
                self._resume(cant_open(reason), out)
            case ActiveOpened(host=host, port=port):
                assert self._deferred is not None
                verb = self._deferred[0]
                self._deferred = None
                self._move(Waiting.NOTHING)
                self.relaying = True
                self.data_lost = None
                self.expect_reply(verb, out)
                out.append(SendTo(Side.SERVER, format_port(host, port)))
            case ActiveFailed(reason=reason):
                self._deferred = None
                self._move(Waiting.NOTHING)
                self.answer(out, cant_open(reason))
            case TransferDone(failure=failure, connected=connected):
                held, self._held, self._held_size = self._held, [], 0
                if failure is None:
                    self._resume(CRLF.join(held) + CRLF, out)
                elif not connected:
                    self._resume(cant_open(failure), out)
                else:
                    self._resume(transfer_aborted(failure), out)
            case DataFailed(reason=reason):
                self._data_failed(reason, out)
            case BackendQuiet():
                self._unsettled = False
                self._move(Waiting.NOTHING)
            case TransferSettled():
                self._probe_unanswered_transfer(out)
            case TlsStarted(version=version, cipher=cipher):
                self.tls_active = True
                self._move(Waiting.NOTHING)
                out.append(Note("tls started", fields={"version": version, "cipher": cipher}))
            case ReadOn():
                pass
            case _:
                raise TypeError(f"unknown event: {event!r}")
        self._advance(out)
        return out

    # -- for the verb handlers ----------------------------------------------

    def forward(self, verb: bytes, argument: bytes, out: list[Command], *, sent: bytes | None = None) -> None:
        """Send the canonical command line to the backend and await its reply."""
        self.expect_reply(verb, out, sent=sent or b"")
        if verb in TRANSFER_VERBS:
            last = self._pending[-1]
            assert isinstance(last, _Forwarded)
            last.argument = argument
        out.append(SendTo(Side.SERVER, format_command(sent or verb, argument)))

    def expect_reply(self, verb: bytes, out: list[Command], *, sent: bytes = b"") -> None:
        """A command for ``verb`` goes to the backend (the caller sends it)."""
        # The user a login command is for is stamped now, not read when its
        # reply comes: a pipelined "USER a, PASS, USER b, PASS" is answered
        # for a, then b.
        user = self.user if verb in LOGIN_VERBS else None
        self._pending.append(_Forwarded(verb, sent, user=user))

    def answer(self, out: list[Command], text: bytes, *, logged_out: bytes | None = None) -> None:
        """Answer the client's command here, in its turn; with ``logged_out`` if, in its turn, the
        client has not logged in (decided then, not now: a PASS may be pending before it)."""
        local = _Local(text, logged_out)
        if self._pending:
            self._pending.append(local)
        else:
            out.append(SendTo(Side.CLIENT, self._local_reply(local)))

    def _local_reply(self, local: _Local) -> bytes:
        return local.logged_out if local.logged_out is not None and not self.logged_in else local.reply

    def open_active(self, verb: bytes, command: OpenActive, out: list[Command]) -> None:
        """Ask the shell to listen for the backend's data connection; read no command meanwhile."""
        self._move(Waiting.ACTIVE)
        self._deferred = (verb, b"")
        out.append(command)

    def start_tls(self, text: bytes, out: list[Command]) -> None:
        """Answer AUTH TLS with ``text`` and have the shell start TLS on the client's side.

        Whatever the client sent after the AUTH line arrived in plain text
        and must never be read as if it came through TLS (the STARTTLS
        command injection of CVE-2011-0411, RFC 4217 section 4): it is
        thrown away, and nothing more is read until the handshake is done.
        """
        dropped = self._client_lines.pending
        if dropped:
            out.append(Note("plaintext after AUTH TLS thrown away", level=Level.WARNING, fields={"bytes": dropped}))
            self._client_lines = LineBuffer(self.policy.max_line)
        self._move(Waiting.TLS)
        out.append(StartTLS(Side.CLIENT, text))

    def abort_pending_transfer(self) -> None:
        """Mark the transfer commands awaiting their reply as aborted by the client."""
        for entry in self._pending:
            if isinstance(entry, _Forwarded) and entry.verb in TRANSFER_VERBS:
                entry.aborted = True

    def _probe_unanswered_transfer(self, out: list[Command]) -> None:
        """Once a transfer settled, ask a NOOP if its reply may never come (``verbs.py``, ABOR step 3).

        Only for a transfer the client aborted, or one that got a second 1xx:
        pure-ftpd's way of ending a broken transfer without a final reply.
        """
        head = self._pending[0] if self._pending else None
        if (
            self._state is Waiting.NOTHING
            and isinstance(head, _Forwarded)
            and (head.aborted or head.failed is not None or head.preliminaries > 1)
            and not head.probed
            and not self._framer.inside
            and not self._server_lines.pending
        ):
            head.probed = True
            out.append(
                Note("asking the backend a NOOP: its transfer is unanswered", fields={"verb": head.verb.decode()})
            )
            self._pending.append(_Forwarded(b"NOOP", probe=True))
            out.append(SendTo(Side.SERVER, b"NOOP" + CRLF))

    def _data_failed(self, reason: str, out: list[Command]) -> None:
        """The newest mapping's data connection will never be made.

        The transfer command it was for gets a 425 in place of whatever the
        backend says once the shell has made it give up (its 1xx, then a 426
        or, from pure-ftpd, nothing: the NOOP probe covers that). If that
        command has not come yet, it will get the 425 from ftpfix.
        """
        for entry in self._pending:
            if isinstance(entry, _Forwarded) and entry.verb in TRANSFER_VERBS and not entry.aborted:
                if self._state is Waiting.TRANSFER and entry is self._answering:
                    return  # its 2xx is held, and TransferDone carries the failure
                entry.failed = reason
                out.append(SettleTransfer())
                return
        self.data_lost = reason

    def _abor_waiting(self) -> bool:
        """True if a complete ABOR line waits in the client's buffer."""
        for line in self._client_lines.complete_lines():
            try:
                verb, _ = parse_command(line, self.policy.aliases)
            except CommandRejected:
                continue
            if verb == b"ABOR":
                return True
        return False

    def transfer_outstanding(self) -> bool:
        """True while the backend owes the final reply to a transfer command."""
        return any(isinstance(entry, _Forwarded) and entry.verb in TRANSFER_VERBS for entry in self._pending)

    # -- states ------------------------------------------------------------

    def _move(self, state: Waiting) -> None:
        if state is not self._state and state not in TRANSITIONS[self._state]:
            raise RuntimeError(f"the core cannot move from {self._state.value} to {state.value}")
        self._state = state

    def _resume(self, text: bytes, out: list[Command]) -> None:
        """The held reply is settled: send ``text`` in its place and read on."""
        out.append(SendTo(Side.CLIENT, text))
        self._move(Waiting.NOTHING)
        self._complete(out, int(text[:3]))

    def _close(self, out: list[Command], reason: str) -> None:
        self._move(Waiting.CLOSED)
        out.append(Close(reason))

    def _advance(self, out: list[Command]) -> None:
        """Read what both sides sent, as far as the state allows."""
        self._read_replies(out)
        self._read_commands(out)
        if (
            self._client_eof
            and self._state is Waiting.NOTHING
            and not self._pending
            and self._deferred is None
            and not self._client_lines.has_line
        ):
            self._close(out, "quit" if self.quit else "client hung up")

    # -- client side -----------------------------------------------------

    def _refuse_proxy_header(self, data: bytes, out: list[Command]) -> bool:
        """Look at the client's first bytes; True if they start a PROXY header (refused)."""
        assert self._opening is not None
        self._opening += data[: len(V2_SIGNATURE) - len(self._opening)]
        verdict = looks_like_header(self._opening)
        if verdict is None:
            return False
        opening, self._opening = self._opening, None
        if not verdict:
            return False
        version = "v2" if opening.startswith(V2_SIGNATURE) else "v1"
        out.append(
            Note(
                "PROXY protocol header refused: only [listen] trusted_proxies may send one, "
                "with [listen] proxy_protocol on",
                level=Level.WARNING,
                fields={"version": version},
            )
        )
        self._close(out, f"PROXY protocol {version} header from a peer that is not trusted")
        return True

    def _reading_commands(self) -> bool:
        if self._opening is not None:
            return False
        if self._state in (Waiting.CLOSED, Waiting.ACTIVE, Waiting.TLS) or len(self._pending) >= MAX_PENDING:
            return False
        # An exclusive command is alone on the wire until its reply is complete.
        last = self._pending[-1] if self._pending else None
        return not (isinstance(last, _Forwarded) and last.verb in EXCLUSIVE_VERBS)

    def _read_commands(self, out: list[Command]) -> None:
        # At most MAX_PENDING lines per event, so a flood of lines that ftpfix
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
                    case "quiet" if self._state is Waiting.NOTHING:
                        self._move(Waiting.QUIET)
                        out.append(AwaitQuiet())
                    case "transfer running" if not self.abort_acted and self._abor_waiting():
                        # An ABOR behind a command that waits for the transfer:
                        # it acts now (RFC 959: it is urgent) and is answered
                        # in its turn, after the commands sent before it.
                        abort_now(self, out)
                return
            line = self._client_lines.next_line()
            if line is None:
                return
            if line is TOO_LONG:
                self._long_lines += 1
                out.append(Count(Tally.LONG_LINE))
                self.answer(out, reply(f"500 Command line too long (the limit is {self.policy.max_line} bytes)."))
                if self._long_lines >= self.policy.max_long_lines:
                    out.append(Note("too many over-long command lines", level=Level.WARNING))
                    self._close(out, "client kept sending over-long lines")
                    return
                continue
            try:
                verb, argument = parse_command(line, self.policy.aliases)
            except CommandRejected as rejected:
                out.append(
                    Note("command refused", level=Level.DEBUG, fields={"why": str(rejected), "length": len(line)})
                )
                self.answer(out, rejected.reply)
                continue
            received = verb
            alias = self.policy.aliases.get(verb)
            if alias is not None:
                fields = {"received": verb.decode("latin-1"), "sent": alias.decode("latin-1")}
                out.append(Note("command alias", level=Level.DEBUG, fields=fields))
                out.append(Count(Tally.ALIAS))
                verb = alias
            if verb == b"PASV":
                self.pasv_received = received
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
            if self._pending or self._server_lines.pending:
                return "replies outstanding"
            if self._unsettled:
                return "quiet"
            return None
        if verb != b"ABOR" and self.transfer_outstanding():
            return "transfer running"
        if verb == b"AUTH" and self._pending:
            # The 234 must be the last plaintext the client reads: every
            # earlier reply goes first.
            return "replies outstanding"
        return None

    def _on_command(self, verb: bytes, argument: bytes, out: list[Command]) -> None:
        # The argument is the client's: escaped and bounded like a user name.
        shown = "****" if verb in SECRET_VERBS else loggable(argument, MAX_LOGGED_ARGUMENT)
        out.append(Note("command", level=Level.DEBUG, fields={"verb": verb.decode("ascii"), "argument": shown}))
        if self.epsv_all and verb in REFUSED_AFTER_EPSV_ALL:
            self.answer(out, reply(f"503 {verb.decode('ascii')} not allowed after EPSV ALL."))
            return
        handler = COMMANDS.get(verb)
        if handler is None:
            self.forward(verb, argument, out)
        else:
            handler(self, verb, argument, out)

    # -- server side -----------------------------------------------------

    def _read_replies(self, out: list[Command]) -> None:
        while self._state in (Waiting.NOTHING, Waiting.QUIET, Waiting.ACTIVE):
            line = self._server_lines.next_line()
            if line is None:
                return
            if line is TOO_LONG:
                raise BackendError(f"backend sent a reply line over {MAX_REPLY_LINE} bytes", reply=OVERLONG_REPLY)
            self._on_reply_line(self._framer.classify(line), out)

    def _on_reply_line(self, line: ReplyLine, out: list[Command]) -> None:
        if line.first and not self._start_reply(line, out):
            return
        if self._action is Action.DROP:
            if line.last and line.code >= 200:
                self._complete(out, line.code)
            elif line.last:
                fields = {"reply": line.raw[:200].decode("latin-1")}
                why = (
                    "ftpfix greeted the client itself"
                    if self._answering is not None and self._answering.verb == GREETING
                    else "the transfer was aborted or failed"
                )
                out.append(Note(f"preliminary reply dropped: {why}", fields=fields))
            return
        if self._action is Action.RELAY:
            out.append(SendTo(Side.CLIENT, line.raw + CRLF))
            if line.last and line.code >= 200:
                answering = self._answering
                if answering is not None and (login := login_outcome(answering.verb, line.code, answering.user)):
                    out.append(login)
                    if line.code == 230:
                        self.logged_in = True
                if line.code == 221 and answering is not None and answering.verb == b"QUIT":
                    self.quit = True
                self._complete(out, line.code)
            return
        self._held.append(line.raw)
        self._held_size += len(line.raw) + 2
        if self._held_size > MAX_HELD_REPLY:
            raise BackendError(f"backend sent a {line.code} reply over {MAX_HELD_REPLY} bytes", reply=OVERLONG_REPLY)
        if line.last:
            self._on_held_reply(line.code, out)

    def _start_reply(self, line: ReplyLine, out: list[Command]) -> bool:
        """Pair the reply that ``line`` starts with its command; False if it ended the session."""
        head = self._pending[0] if self._pending else None
        if isinstance(head, _Forwarded) and head.verb == b"ABOR" and line.code not in ABOR_REPLIES:
            # A forwarded ABOR the server did not answer (pure-ftpd, when the
            # transfer ended just before it): this reply is the next
            # command's. Answer the ABOR for it, so the client stays in step.
            out.append(Note("the server did not answer ABOR", fields={"next_reply": line.code}))
            self._pending.popleft()
            out.append(SendTo(Side.CLIENT, ABORT_DONE))
            self._flush_local(out)
            head = self._pending[0] if self._pending else None
        if isinstance(head, _Forwarded) and head.probed and line.code == 200:
            # The probe's answer came first: the aborted transfer's reply never
            # will (no transfer command is answered with 200). Supply it.
            out.append(
                Note("the server did not answer the transfer", level=Level.WARNING, fields={"verb": head.verb.decode()})
            )
            self._pending.popleft()
            out.append(CancelTransfer())
            out.append(SendTo(Side.CLIENT, head.replacement()))
            self._replied(head, int(head.replacement()[:3]), out)
            self._flush_local(out)
            head = self._pending[0] if self._pending else None
        if not isinstance(head, _Forwarded):
            self._out_of_turn(line, out)
            return False
        self._answering = head
        self._reply_multiline = not line.last
        if line.code < 200 and head.verb in TRANSFER_VERBS:
            head.preliminaries += 1
            if head.preliminaries == 2 and not head.aborted and head.failed is None:
                # pure-ftpd's end of a broken transfer: a second 150, and no
                # final reply. Ask, once the data connection is over.
                out.append(SettleTransfer())
        self._action = reply_action(self, head, line.code)
        if head.verb in TRANSFER_VERBS and line.code >= 300:
            # Refused or failed: the data connection has nothing more to carry.
            out.append(CancelTransfer())
        return True

    def _on_held_reply(self, code: int, out: list[Command]) -> None:
        """A reply held for rewriting is complete."""
        if self._action is Action.REPLACED:
            held, self._held, self._held_size = self._held, [], 0
            answering = self._answering
            assert answering is not None
            out.append(Note("failed transfer's reply", fields={"reply": held[-1][:200].decode("latin-1")}))
            out.append(SendTo(Side.CLIENT, answering.replacement()))
            self._complete(out, int(answering.replacement()[:3]))
            return
        if self._action is Action.TRANSFER:
            self._move(Waiting.TRANSFER)
            out.append(FinishTransfer())
            return
        held, self._held, self._held_size = self._held, [], 0
        answering = self._answering
        assert answering is not None
        match self._action:
            case Action.PASSIVE:
                self._on_passive_reply(code, CRLF.join(held) + CRLF, answering, out)
            case Action.FEAT:
                lines, self.backend_knows_epsv = rewrite_feat(held, tls=self.policy.tls is not TlsMode.OFF)
                out.append(SendTo(Side.CLIENT, b"".join(held_line + CRLF for held_line in lines)))
                self._complete(out)
            case Action.FALLBACK:
                fields = {"reply": held[0].decode("latin-1")}
                out.append(Note("backend does not know EPSV; sending PASV", fields=fields))
                out.append(Count(Tally.EPSV_TRANSLATED))
                self.backend_knows_epsv = False
                answering.sent = b"PASV"
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
        out.append(
            Note("backend reply answers no command; ending the session", level=Level.WARNING, fields={"reply": text})
        )
        out.append(SendTo(Side.CLIENT, OUT_OF_TURN))
        self._close(out, "backend reply answered no command")

    def _on_passive_reply(self, code: int, text: bytes, answering: _Forwarded, out: list[Command]) -> None:
        try:
            if code == 227:
                host, port = parse_227(text)
                advertised = str(host)
            else:
                port, advertised = parse_229(text), ""
            self._check_passive_port(port)
        except ValueError as error:
            fields = {"reply": text.decode("latin-1").strip(), "error": str(error)}
            out.append(Note(f"unusable {code} from the backend", level=Level.WARNING, fields=fields))
            out.append(SendTo(Side.CLIENT, cant_open("the server's passive reply was unusable")))
            self._complete(out)
            return
        if self._server_lines.pending:
            # Nothing else is outstanding (rule 3): whatever follows the 227
            # answers no command, and the 227 may be forged too.
            fields = {"after": self._server_lines.head(200).decode("latin-1")}
            out.append(Note("backend sent more after its 227; ending the session", level=Level.WARNING, fields=fields))
            out.append(SendTo(Side.CLIENT, OUT_OF_TURN))
            self._close(out, "backend reply answered no command")
            return
        self._move(Waiting.PASSIVE)
        out.append(OpenPassive(advertised_host=advertised, backend_port=port, extended=answering.verb == b"EPSV"))

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

    def _complete(self, out: list[Command], code: int | None = None) -> None:
        """The reply to the command at the head of the FIFO is complete;
        ``code`` is the final reply the client got for it, if it got one."""
        if self._pending and isinstance(head := self._pending[0], _Forwarded):
            self._pending.popleft()
            if self._reply_multiline:
                self._unsettled = True
            if code is not None:
                self._replied(head, code, out)
        self._flush_local(out)

    def _replied(self, entry: _Forwarded, code: int, out: list[Command]) -> None:
        """A transfer command got its final reply: one line for the transfer log."""
        if entry.verb in TRANSFER_VERBS:
            out.append(TransferReplied(entry.verb.decode("ascii"), entry.argument, code, self.relaying))

    def _flush_local(self, out: list[Command]) -> None:
        """Send the replies ftpfix made up whose turn has come."""
        while self._pending and isinstance(head := self._pending[0], _Local):
            self._pending.popleft()
            out.append(SendTo(Side.CLIENT, self._local_reply(head)))


__all__ = ["TRANSITIONS", "Policy", "Session", "Waiting"]
