"""The verbs ftpfix treats specially, in one table each way.

``COMMANDS`` maps a client verb to what ftpfix does with it instead of
forwarding it unchanged; ``reply_action`` says what ftpfix does with the
backend's reply to a verb. Everything not named here is relayed as it is.
``Session`` (``session.py``) keeps the order of commands and replies; this
module decides what each special verb means.

ABOR, in full (RFC 959 section 4.1.3): during a transfer whose data
connection ftpfix relays, ABOR never goes to the backend. ftpfix breaks the
data connection instead (``AbortTransfer``: both ends are reset), so every
server ends the transfer the same way, at once, and ftpfix answers the ABOR
itself with 226, right after the transfer's own reply:

1. ``_abor``: ``AbortTransfer``, a 226 queued behind the transfer command,
   the command marked aborted, and ``SettleTransfer``.
2. The backend answers the transfer: 426 (or 451), relayed; or 226 if it had
   finished, which ftpfix turns into 426 unless every byte reached the
   client. A 1xx after the ABOR is dropped (``Action.DROP``): the client
   reads the next two replies as the transfer's and ABOR's.
3. pure-ftpd answers a broken data connection with a second 150 and nothing
   more, with or without ABOR. After an ABOR, or after a second 1xx to a
   transfer, once the data connection is closed and the backend quiet
   (``SettleTransfer``, ``TransferSettled``), ftpfix sends the backend a NOOP
   (a probe) if the transfer is still unanswered. RFC 959 never answers a transfer command
   with 200, so a 200 then proves the reply will not come: ftpfix supplies
   the 426 (``Session._start_reply``) and drops the 200.

Servers disagree on everything else: ProFTPD in ASCII mode answers ABOR
before the transfer, vsftpd only notices it through SIGURG, pure-ftpd skips
the reply when the transfer has just ended. Only when the data connection
bypasses ftpfix (``[active] mode = "passthrough"``) is ABOR forwarded, in
RFC 959's urgent form.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from ipaddress import IPv6Address
from typing import TYPE_CHECKING

from .. import __version__
from .commands import (
    AbortTransfer,
    CancelTransfer,
    Count,
    Level,
    Note,
    OpenActive,
    SendTo,
    SettleTransfer,
    Side,
    Tally,
    TransferStarted,
)
from .grammar import (
    ABORT_DONE,
    CRLF,
    NOTHING_TO_ABORT,
    SEPARATORS,
    AddressError,
    UnsupportedNetwork,
    cant_open,
    format_port,
    parse_eprt,
    parse_port,
    reply,
)
from .logins import NOT_LOGGED_IN, loggable, login_failed
from .policy import ActiveMode, EpsvMode, TlsMode
from .state import Waiting

if TYPE_CHECKING:
    from .commands import Command
    from .session import Session, _Forwarded

#: Commands whose final reply may only go to the client once the data relay has
#: finished (RFC 959 section 4.1.3 lists the ones that use a data connection).
TRANSFER_VERBS = frozenset({b"RETR", b"STOR", b"STOU", b"APPE", b"LIST", b"NLST", b"MLSD"})

#: The transfer commands whose data flows from the backend to the client.
DOWNLOAD_VERBS = frozenset({b"RETR", b"LIST", b"NLST", b"MLSD"})

#: Client verbs ftpfix answers with a mapping of its own.
PASSIVE_VERBS = frozenset({b"PASV", b"EPSV"})

#: Commands that set up a data connection. They are sent to the backend alone,
#: with no other reply outstanding (see the session's rule 3).
EXCLUSIVE_VERBS = frozenset({b"PASV", b"EPSV", b"PORT", b"EPRT"})

#: Data-connection setup commands refused after ``EPSV ALL`` (RFC 2428 section 4).
REFUSED_AFTER_EPSV_ALL = frozenset({b"PASV", b"PORT", b"EPRT", b"LPRT", b"LPSV"})

#: Lowest port an active data connection may go to (RFC 2577 section 3: a
#: PORT to a privileged port is how bounce attacks reach other services).
#: A backend's passive port below it is just as implausible.
PORT_FLOOR = 1024

#: Replies a server gives to a forwarded ABOR (RFC 959 section 4.1.3: 225 or
#: 226, after the transfer's 426), errors, and 426 itself.
ABOR_REPLIES = frozenset({225, 226, 421, 426, 450, 451, 500, 501, 502, 503, 504})

#: Backend replies to EPSV that mean "I do not know EPSV" (RFC 959 4.2).
EPSV_UNKNOWN = frozenset({500, 502})

#: Telnet "interrupt process" and "synch" (RFC 854): IAC IP, then IAC DM.
TELNET_IP = b"\xff\xf4"
TELNET_DM = b"\xff\xf2"

#: User names of anonymous FTP (RFC 1635).
ANONYMOUS_USERS = frozenset({b"ANONYMOUS", b"FTP"})

#: Commands whose argument is never logged.
SECRET_VERBS = frozenset({b"PASS", b"ACCT"})

#: Commands ftpfix answers itself with a refusal, and why.
REFUSED = {
    # RFC 4217: after AUTH TLS the control channel is encrypted, and ftpfix
    # could no longer see, let alone rewrite, a single 227.
    b"AUTH": "502 AUTH is not available through this FTP proxy; use plain FTP.",
    # RFC 1639's long forms carry addresses ftpfix does not rewrite.
    b"LPSV": "502 LPSV is not supported; use EPSV or PASV.",
    b"LPRT": "502 LPRT is not supported; use EPRT or PORT.",
}


class Action(enum.Enum):
    """What to do with the backend's reply to a command."""

    RELAY = "relay"  # pass it to the client line by line
    PASSIVE = "passive"  # hold the 227 or 229 and open a mapping
    FEAT = "feat"  # hold the feature list and rewrite it
    FALLBACK = "fallback"  # swallow the backend's "EPSV unknown", send PASV
    TRANSFER = "transfer"  # hold a transfer's 2xx until the relay has finished
    DROP = "drop"  # say nothing: a preliminary reply to a transfer that was aborted or failed
    REPLACED = "replaced"  # say 426 (aborted) or 425 (never connected) for the server's failure


# -- commands ------------------------------------------------------------------

Handler = Callable[["Session", bytes, bytes, "list[Command]"], None]


def _user(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    name = argument.strip(SEPARATORS)
    if _tls_missing(session):
        # RFC 4217 section 11: a server whose policy requires TLS answers USER with 530.
        session.answer(out, TLS_REQUIRED_FOR_LOGIN)
        return
    if session.policy.deny_anonymous and name.upper() in ANONYMOUS_USERS:
        # A failed login like any other, for fail2ban: ftpfix is the server here.
        out.append(login_failed(loggable(name), NOT_LOGGED_IN, reason="anonymous logins are refused"))
        session.answer(out, reply("530 Anonymous logins are not allowed here."))
        return
    # What the backend pairs the next PASS with, and the session summary's user.
    session.user = loggable(name)
    session.forward(verb, argument, out)


def _pasv(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if isinstance(session.client, IPv6Address):
        session.answer(out, reply("425 Can't open data connection: a 227 cannot carry an IPv6 address, use EPSV."))
        return
    session.forward(verb, argument, out)


def _epsv(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    # RFC 2428 section 3: "EPSV" or "EPSV <net-prt>" asks for a port,
    # "EPSV ALL" promises only EPSV from now on. The data port is on the
    # control connection's address, so only that protocol can be served.
    selector = argument.strip(SEPARATORS).upper()
    family = b"2" if isinstance(session.client, IPv6Address) else b"1"
    if selector == b"ALL":
        session.epsv_all = True
        session.answer(out, reply("200 EPSV ALL command successful."))
        return
    if selector not in (b"", family):
        session.answer(out, reply(f"522 Network protocol not supported, use ({family.decode()})"))
        return
    # A legacy backend may not know EPSV; every one knows PASV, and the
    # 229 the client gets carries no address, so either will do.
    mode = session.policy.epsv
    send_epsv = mode == EpsvMode.PASSTHROUGH or (mode == EpsvMode.AUTO and session.backend_knows_epsv)
    if not send_epsv:
        out.append(Count(Tally.EPSV_TRANSLATED))
    session.forward(b"EPSV", b"", out, sent=b"EPSV" if send_epsv else b"PASV")


def _active(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    name = verb.decode("ascii")
    if session.policy.active == ActiveMode.DENY:
        session.answer(out, reply(f"502 {name} is disabled here; use passive mode (PASV or EPSV)."))
        return
    try:
        host, port = parse_port(argument) if verb == b"PORT" else parse_eprt(argument)
    except UnsupportedNetwork:
        session.answer(out, reply("522 Network protocol not supported, use (1,2)"))
        return
    except AddressError as error:
        session.answer(out, reply(f"501 Syntax error in {name}: {error}."))
        return
    # Bounce protection, RFC 2577 section 3: data goes only to the client
    # itself, and never to a privileged port.
    if port < PORT_FLOOR:
        out.append(
            Note("active mode to a privileged port refused", level=Level.WARNING, fields={"target": f"{host}:{port}"})
        )
        out.append(Count(Tally.BOUNCE))
        session.answer(out, reply(f"504 {name} refused: port {port} is below {PORT_FLOOR}."))
        return
    if host != session.client:
        client = session.client
        if client is not None and session.policy.fix_address and (host.is_private or host.is_unspecified):
            # A client behind its own NAT names its private address.
            out.append(Note("active mode address fixed", fields={"sent": str(host), "used": str(client)}))
            host = client
        else:
            out.append(
                Note("active mode to another address refused", level=Level.WARNING, fields={"target": f"{host}:{port}"})
            )
            out.append(Count(Tally.BOUNCE))
            session.answer(out, reply(f"501 {name} refused: the address must be your own ({client})."))
            return
    if session.policy.active == ActiveMode.PASSTHROUGH:
        # The backend gets the checked address, re-serialised: never the
        # client's own line, which may name another host. The data
        # connection then bypasses ftpfix.
        session.relaying = False
        session.expect_reply(verb, out)
        out.append(SendTo(Side.SERVER, format_port(host, port)))
        return
    session.open_active(verb, OpenActive(host=str(host), port=port), out)


def abort_now(session: Session, out: list[Command]) -> None:
    """Break the relayed transfer for an ABOR still queued behind other commands
    (``_abor`` answers it when its turn comes)."""
    if session.relaying and session.transfer_outstanding() and session.waiting_for is not Waiting.TRANSFER:
        session.abort_acted = True
        out.append(AbortTransfer())
        session.abort_pending_transfer()
        out.append(SettleTransfer())


def _abor(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if session.abort_acted:
        # It acted ahead of its turn (``abort_now``); this is its turn.
        session.abort_acted = False
        session.answer(out, ABORT_DONE)
        return
    if not session.transfer_outstanding():
        # Nothing to abort. pure-ftpd never answers an ABOR it does not
        # need, and the reply it owes would shift every later pairing.
        session.answer(out, NOTHING_TO_ABORT)
        return
    if session.waiting_for is Waiting.TRANSFER:
        # The backend has answered already; its 2xx waits for the relay, and
        # turns into a 426 if the data was not all delivered.
        out.append(AbortTransfer())
        session.answer(out, ABORT_DONE)
        return
    if session.relaying:
        # ftpfix relays the data connection: break it (steps 1 to 3 above).
        out.append(AbortTransfer())
        session.answer(out, ABORT_DONE)
        session.abort_pending_transfer()
        out.append(SettleTransfer())
        return
    # The data connection bypasses ftpfix: only the backend can stop it.
    # RFC 959's form, IAC IP, then the synch (IAC DM, its DM as TCP urgent
    # data), then ABOR: vsftpd notices an ABOR during a transfer only through
    # SIGURG, and the client's own urgent mark does not survive ftpfix.
    session.expect_reply(b"ABOR", out)
    out.append(SendTo(Side.SERVER, TELNET_IP + TELNET_DM[:1]))
    out.append(SendTo(Side.SERVER, TELNET_DM[1:], urgent=True))
    out.append(SendTo(Side.SERVER, b"ABOR" + CRLF))
    out.append(AbortTransfer())  # whatever data connection ftpfix still holds


def _transfer(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if session.policy.tls is TlsMode.REQUIRED and not session.protected:
        # RFC 4217 section 9: 521 for a transfer the policy refuses at this PROT level.
        # The mapping the client may have connected to is of no more use.
        out.append(CancelTransfer())
        session.answer(out, reply("521 Data connections must be protected here: send PBSZ 0 and PROT P first."))
        return
    if session.protected and not session.relaying:
        # The data connection bypasses ftpfix ([active] mode = "passthrough"), and the
        # backend speaks no TLS: the client would wait for a handshake nobody makes.
        session.answer(out, reply("521 PROT P needs the data connection through ftpfix: use passive mode."))
        return
    if session.relaying and session.data_lost is not None:
        # The mapping's data connection will never be made; asking the
        # backend would leave it waiting for one until its own timeout.
        session.answer(out, cant_open(session.data_lost))
        return
    session.forward(verb, argument, out)
    out.append(TransferStarted(download=verb in DOWNLOAD_VERBS, protected=session.protected))


# -- SITE FTPFIX: ftpfix's own subcommand, for ``ftpfix diagnose`` ------------

#: The SITE subcommand ftpfix answers itself and never forwards (RFC 959
#: section 4.1.3 leaves SITE's arguments to each server).
SITE_FTPFIX = b"FTPFIX"


def site_ftpfix_reply(session: Session) -> bytes:
    """The 211 (RFC 959: "system status") a diagnosing client reads.

    It says only what this client can see for itself through ftpfix: the
    version, the passive ports its 227s name, and how its own last PASV
    arrived. No backend address, no internal network, no other session's
    state: nothing here is news to someone who can already log in.
    """
    ports = session.policy.passive_ports
    arrived = session.pasv_received
    if arrived is None:
        last = "none"
    elif arrived == b"PASV":
        last = "PASV"
    else:
        # An alias the admin configured: letters and '@' (parse_command), shown escaped all the same.
        last = f"{loggable(arrived)} (repaired)"
    lines = [
        f"211-ftpfix {__version__}",
        f" passive-ports: {f'{ports.start}-{ports.stop - 1}' if ports else 'unknown'}",
        f" last-pasv: {last}",
        "211 End of SITE FTPFIX.",
    ]
    return b"".join(reply(line) for line in lines)


def _site(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    subcommand, _, rest = argument.strip(SEPARATORS).partition(b" ")
    if subcommand.upper() != SITE_FTPFIX:
        session.forward(verb, argument, out)
        return
    # Never forwarded, whatever follows: the backend must not see (or echo) it.
    if rest.strip(SEPARATORS):
        session.answer(out, reply("501 SITE FTPFIX takes no argument."))
        return
    # What the reply says is taken now, in the line's order; whether the client may read it, in its turn.
    session.answer(out, site_ftpfix_reply(session), logged_out=reply("530 Log in first (SITE FTPFIX)."))


def _refuse(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    session.answer(out, reply(REFUSED[verb]))


# -- FTPS (RFC 4217): answered by ftpfix, never forwarded; the backend stays plain --

#: USER (or PASS, ACCT) before AUTH TLS where TLS is required.
TLS_REQUIRED_FOR_LOGIN = reply("530 TLS is required here: send AUTH TLS before logging in.")

#: The AUTH mechanisms ftpfix answers with a TLS handshake. "SSL" is the
#: pre-RFC name some old clients still send; ftpfix speaks TLS for it too.
AUTH_MECHANISMS = frozenset({b"TLS", b"SSL", b"TLS-C"})


def _tls_missing(session: Session) -> bool:
    return session.policy.tls is TlsMode.REQUIRED and not session.tls_active


def _auth(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if session.policy.tls is TlsMode.OFF:
        session.answer(out, reply(REFUSED[b"AUTH"]))
        return
    mechanism = argument.strip(SEPARATORS).upper()
    if session.tls_active:
        # RFC 4217 section 4: no second AUTH on a protected connection.
        session.answer(out, reply("503 The control connection is already protected."))
        return
    if mechanism not in AUTH_MECHANISMS:
        session.answer(out, reply("504 AUTH type not supported: use AUTH TLS."))
        return
    # _held_back kept AUTH until every earlier reply was out, so the 234 goes now.
    session.start_tls(reply("234 AUTH TLS successful: proceed with the TLS handshake."), out)


def _login(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if _tls_missing(session):
        session.answer(out, TLS_REQUIRED_FOR_LOGIN)
        return
    session.forward(verb, argument, out)


def _pbsz(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if not session.tls_active:
        # RFC 2228 section 3: PBSZ needs a completed security exchange.
        session.answer(out, reply("503 PBSZ needs AUTH TLS first."))
        return
    session.pbsz = True
    # RFC 4217 section 8: the buffer size is 0 for TLS, whatever was asked.
    session.answer(out, reply("200 PBSZ=0"))


def _prot(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    level = argument.strip(SEPARATORS).upper()
    if not session.tls_active or not session.pbsz:
        session.answer(out, reply("503 PROT needs AUTH TLS and PBSZ first."))
        return
    if level in (b"P", b"C"):
        session.protected = level == b"P"
        session.answer(out, reply(f"200 Protection level set to {level.decode()}."))
        return
    if level in (b"S", b"E"):
        session.answer(out, reply("536 Protection level not supported by TLS: use P or C."))
        return
    session.answer(out, reply("504 Unknown protection level: use P or C."))


def _ccc(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
    if session.policy.tls is TlsMode.OFF and not session.policy.backend_tls:
        session.forward(verb, argument, out)
        return
    # RFC 4217 section 6: CCC is optional. ftpfix keeps the control channel
    # protected: a plaintext 227 would be open to every NAT helper again.
    session.answer(out, reply("502 CCC is not supported: the control connection stays protected."))


def _tls_or_forward(handler: Handler) -> Handler:
    """``handler`` when ftpfix terminates TLS, or speaks TLS to the backend
    itself (a client's PROT C must not reach a backend whose data connections
    ftpfix protects); otherwise the verb goes to the backend as before."""

    def dispatch(session: Session, verb: bytes, argument: bytes, out: list[Command]) -> None:
        if session.policy.tls is TlsMode.OFF and not session.policy.backend_tls:
            session.forward(verb, argument, out)
        else:
            handler(session, verb, argument, out)

    return dispatch


#: What ftpfix does with a client's command, by verb; any other is forwarded.
COMMANDS: dict[bytes, Handler] = {
    b"USER": _user,
    b"PASV": _pasv,
    b"EPSV": _epsv,
    b"PORT": _active,
    b"EPRT": _active,
    b"ABOR": _abor,
    **{verb: _transfer for verb in TRANSFER_VERBS},
    **{verb: _refuse for verb in REFUSED},
    b"AUTH": _auth,
    b"PASS": _tls_or_forward(_login),
    b"ACCT": _tls_or_forward(_login),
    b"PBSZ": _tls_or_forward(_pbsz),
    b"PROT": _tls_or_forward(_prot),
    b"CCC": _ccc,
    b"SITE": _site,
}


# -- replies -------------------------------------------------------------------


def reply_action(session: Session, answering: _Forwarded, code: int) -> Action:
    """What to do with a reply with ``code`` to the command ``answering``."""
    # By reply code, not by the command sent: some servers answer EPSV
    # with a 227, and a 229 is as good as a 227 for ftpfix.
    if answering.verb in PASSIVE_VERBS and code in (227, 229):
        return Action.PASSIVE
    if answering.sent == b"EPSV" and code in EPSV_UNKNOWN and session.policy.epsv == EpsvMode.AUTO:
        return Action.FALLBACK
    if answering.verb == b"FEAT" and code == 211:
        return Action.FEAT
    if answering.verb in TRANSFER_VERBS and 200 <= code < 300:
        return Action.TRANSFER
    if answering.probe:
        return Action.DROP  # ftpfix's own NOOP: its reply is for ftpfix alone
    if answering.verb == b"" and session.greeted and code < 400:
        # The greeting, when ftpfix already sent the client a 220 of its own
        # (``Session.greeted``): a second one would answer the client's first command.
        return Action.DROP
    gave_up = answering.aborted or answering.failed is not None
    if answering.aborted and code >= 400 and code not in (421, 426):
        # RFC 959 section 4.1.3: an aborted transfer is answered 426, whatever
        # the server calls its broken data connection (pure-ftpd: 451). A 421
        # still says the server is closing the connection.
        return Action.REPLACED
    if answering.failed is not None and code >= 400 and code != 421:
        # The data connection was never made (``DataFailed``): the server's
        # 426 for the connection ftpfix made and reset so that it would give
        # up is really a 425, and says nothing of why.
        return Action.REPLACED
    if gave_up and code < 200:
        # After ABOR a client reads two replies, the transfer's and ABOR's
        # (RFC 959 section 4.1.3); a 1xx in between would be taken for the
        # first. pure-ftpd sends one when its data connection breaks, and
        # every server one for the connection ftpfix makes it give up on.
        return Action.DROP
    return Action.RELAY
