"""The core's half of FTPS (RFC 4217): AUTH, PBSZ, PROT, CCC and the policy,
as transcripts of events in and commands out. The backend never sees any of them."""

from __future__ import annotations

from functools import partial

from ftpfix.protocol import (
    CancelTransfer,
    DataReceived,
    Policy,
    SendTo,
    Session,
    Side,
    StartTLS,
    TlsMode,
    TlsStarted,
    Waiting,
)
from ftpfix.protocol.commands import Note

GREETING = DataReceived(Side.SERVER, b"220 ready\r\n")


def sent(commands: list, side: Side | None = None) -> list:
    return [c for c in commands if not isinstance(c, Note) and (side is None or getattr(c, "side", side) is side)]


def session(mode: TlsMode = TlsMode.OPTIONAL) -> Session:
    core = Session(Policy(tls=mode))
    assert sent(core.receive(GREETING)) == [SendTo(Side.CLIENT, b"220 ready\r\n")]
    return core


def client(core: Session, data: bytes) -> list:
    return sent(core.receive(DataReceived(Side.CLIENT, data)))


def test_auth_tls_starts_tls_and_nothing_else_is_read_until_the_handshake() -> None:
    core = session()
    out = client(core, b"AUTH TLS\r\n")
    assert out == [StartTLS(Side.CLIENT, b"234 AUTH TLS successful: proceed with the TLS handshake.\r\n")]
    assert core.waiting_for is Waiting.TLS
    assert sent(core.receive(TlsStarted("TLSv1.3", "TLS_AES_256_GCM_SHA384"))) == []
    assert core.tls_active
    assert client(core, b"PBSZ 0\r\n") == [SendTo(Side.CLIENT, b"200 PBSZ=0\r\n")]
    assert client(core, b"PROT P\r\n") == [SendTo(Side.CLIENT, b"200 Protection level set to P.\r\n")]
    assert core.protected
    assert client(core, b"PROT C\r\n") == [SendTo(Side.CLIENT, b"200 Protection level set to C.\r\n")]
    assert not core.protected
    assert client(core, b"AUTH TLS\r\n")[0].data.startswith(b"503")
    assert client(core, b"CCC\r\n")[0].data.startswith(b"502")


def test_plaintext_pipelined_behind_auth_is_thrown_away() -> None:
    """CVE-2011-0411's class: bytes after AUTH TLS came in plain text."""
    core = session()
    out = core.receive(DataReceived(Side.CLIENT, b"AUTH TLS\r\nUSER mallory\r\nDELE x\r\n"))
    assert sent(out) == [StartTLS(Side.CLIENT, b"234 AUTH TLS successful: proceed with the TLS handshake.\r\n")]
    assert any(isinstance(c, Note) and c.event == "plaintext after AUTH TLS thrown away" for c in out)
    assert sent(core.receive(TlsStarted("TLSv1.3", "x"))) == []  # nothing left to read
    assert client(core, b"USER alice\r\n") == [SendTo(Side.SERVER, b"USER alice\r\n")]


def test_auth_waits_for_earlier_replies() -> None:
    core = session()
    assert client(core, b"SYST\r\nAUTH TLS\r\n") == [SendTo(Side.SERVER, b"SYST\r\n")]
    out = sent(core.receive(DataReceived(Side.SERVER, b"215 UNIX\r\n")))
    assert out == [
        SendTo(Side.CLIENT, b"215 UNIX\r\n"),
        StartTLS(Side.CLIENT, b"234 AUTH TLS successful: proceed with the TLS handshake.\r\n"),
    ]


def test_pbsz_and_prot_need_auth_first() -> None:
    core = session()
    assert client(core, b"PBSZ 0\r\n")[0].data.startswith(b"503")
    assert client(core, b"PROT P\r\n")[0].data.startswith(b"503")
    assert client(core, b"AUTH KERBEROS\r\n")[0].data.startswith(b"504")


def test_required_mode_refuses_login_before_auth_and_clear_transfers() -> None:
    core = session(TlsMode.REQUIRED)
    assert client(core, b"USER alice\r\n") == [
        SendTo(Side.CLIENT, b"530 TLS is required here: send AUTH TLS before logging in.\r\n")
    ]
    assert client(core, b"PASS secret\r\n")[0].data.startswith(b"530")
    client(core, b"AUTH TLS\r\n")
    core.receive(TlsStarted("TLSv1.3", "x"))
    assert client(core, b"USER alice\r\n") == [SendTo(Side.SERVER, b"USER alice\r\n")]
    core.receive(DataReceived(Side.SERVER, b"331 password\r\n"))
    out = client(core, b"RETR f\r\n")
    assert out[0] == CancelTransfer()
    assert out[1].data.startswith(b"521")


def test_off_keeps_todays_behaviour() -> None:
    core = session(TlsMode.OFF)
    assert client(core, b"AUTH TLS\r\n")[0].data.startswith(b"502 AUTH is not available")
    assert client(core, b"PBSZ 0\r\n") == [SendTo(Side.SERVER, b"PBSZ 0\r\n")]


def test_feat_lists_ftpfix_tls_features_not_the_backends() -> None:
    core = session()
    assert client(core, b"FEAT\r\n") == [SendTo(Side.SERVER, b"FEAT\r\n")]
    out = sent(core.receive(DataReceived(Side.SERVER, b"211-Features:\r\n AUTH SSL\r\n MDTM\r\n211 End\r\n")))
    features = b"211-Features:\r\n MDTM\r\n EPRT\r\n EPSV\r\n AUTH TLS\r\n PBSZ\r\n PROT\r\n211 End\r\n"
    assert out == [SendTo(Side.CLIENT, features)]


def fed(core: Session, data: bytes, *, byte_at_a_time: bool) -> list:
    """What the core says to ``data`` from the client, given whole or one byte at a time."""
    if not byte_at_a_time:
        return client(core, data)
    return [command for i in range(len(data)) for command in client(core, data[i : i + 1])]


def test_implicit_session_starts_protected() -> None:
    """The implicit FTPS port: TLS is on before the greeting, data
    connections are protected from the start; PBSZ and PROT are still
    answered (clients send them anyway), AUTH gets 503, PROT C is honoured."""
    for byte_at_a_time in (False, True):
        core = Session(Policy(tls=TlsMode.OPTIONAL), implicit_tls=True)
        assert (core.tls_active, core.pbsz, core.protected) == (True, True, True)
        assert sent(core.receive(GREETING)) == [SendTo(Side.CLIENT, b"220 ready\r\n")]
        say = partial(fed, core, byte_at_a_time=byte_at_a_time)
        assert say(b"AUTH TLS\r\n")[0].data.startswith(b"503")
        assert say(b"PBSZ 0\r\n") == [SendTo(Side.CLIENT, b"200 PBSZ=0\r\n")]
        assert say(b"PROT C\r\n") == [SendTo(Side.CLIENT, b"200 Protection level set to C.\r\n")]
        assert not core.protected
        assert say(b"PROT P\r\n") == [SendTo(Side.CLIENT, b"200 Protection level set to P.\r\n")]
        assert core.protected


def test_required_mode_lets_an_implicit_session_log_in() -> None:
    core = Session(Policy(tls=TlsMode.REQUIRED), implicit_tls=True)
    core.receive(GREETING)
    assert client(core, b"USER alice\r\n") == [SendTo(Side.SERVER, b"USER alice\r\n")]


def test_backend_tls_keeps_pbsz_prot_and_ccc_from_the_backend() -> None:
    """With TLS to the backend, ftpfix set the backend's PBSZ and PROT itself;
    a plain client's PBSZ, PROT or CCC must never reach it (a PROT C would
    unprotect the backend's data connections behind ftpfix's back, a CCC
    would desynchronise its TLS)."""
    core = Session(Policy(tls=TlsMode.OFF, backend_tls=True))
    core.receive(GREETING)
    assert client(core, b"PBSZ 0\r\n")[0].data.startswith(b"503")
    assert client(core, b"PROT C\r\n")[0].data.startswith(b"503")
    assert client(core, b"CCC\r\n")[0].data.startswith(b"502")
    assert client(core, b"AUTH TLS\r\n")[0].data.startswith(b"502")
    assert client(core, b"USER alice\r\n") == [SendTo(Side.SERVER, b"USER alice\r\n")]
    core.receive(DataReceived(Side.SERVER, b"331 password\r\n"))
    assert client(core, b"PASS secret\r\n") == [SendTo(Side.SERVER, b"PASS secret\r\n")]
