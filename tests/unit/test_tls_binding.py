"""Unit test: a session's server context, once its control handshake is done,
gives data connections no TLS 1.3 ticket of their own (tls.py ``_seal``),
while the control connection's session keeps resuming.

Over in-memory streams, trustme certificates: the attack this pins is
``tests/attacks/test_redteam_tls_stolen_ticket.py`` (a data connection refused
for a full handshake kept the session it was given and resumed it later).
"""

from __future__ import annotations

import gc
import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from ftpfix.config import Tls
from ftpfix.net.tls import accept_tls, server_context

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@pytest.fixture
def tls_setup(tmp_path: Path) -> tuple[Tls, ssl.SSLContext]:
    ca = trustme.CA()
    leaf = ca.issue_cert("ftpfix.test")
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(certificate=str(tmp_path / "cert.pem"), key=str(tmp_path / "key.pem")), client


async def connect(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None, *, control: bool = False
) -> tuple[trio.SSLStream, trio.SSLStream]:
    """A handshake over memory; the client reads once so TLS 1.3 tickets land."""
    left, right = trio.testing.memory_stream_pair()
    client_side = trio.SSLStream(left, client, server_hostname="ftpfix.test")
    if session is not None:
        client_side.session = session
    result: list[trio.SSLStream] = []

    async def serve() -> None:
        if control:
            result.append(await accept_tls(right, server))
        else:
            stream = trio.SSLStream(right, server, server_side=True)
            await stream.do_handshake()
            result.append(stream)
        await result[0].send_all(b"x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client_side.do_handshake()
        assert await client_side.receive_some(1) == b"x"
    return client_side, result[0]


@pytest.mark.parametrize("version", list(VERSIONS))
def test_the_control_session_resumes_even_after_a_data_connection_ended_uncleanly(tls_setup, version) -> None:
    """A failed transfer resets its data connection without close_notify; OpenSSL
    then drops that session from a context's id cache, so binding must not rest
    on that cache (it did in a first version of this fix)."""
    trio.run(check_resumes, *tls_setup, version)


async def check_resumes(tls: Tls, client: ssl.SSLContext, version: str) -> None:
    client.maximum_version = VERSIONS[version]
    server = server_context(tls)
    control, _control_server = await connect(server, client, None, control=True)
    for _ in range(3):
        data, data_server = await connect(server, client, control.session)
        assert data_server.session_reused
        del data, data_server  # freed without close_notify, as a reset transfer
        gc.collect()


def test_a_data_connections_full_handshake_gets_no_tls13_ticket(tls_setup) -> None:
    trio.run(check_no_ticket, *tls_setup)


async def check_no_ticket(tls: Tls, client: ssl.SSLContext) -> None:
    server = server_context(tls)
    control, _control_server = await connect(server, client, None, control=True)
    assert control.session is not None and control.session.has_ticket
    thief, thief_server = await connect(server, client, None)  # a full handshake
    assert not thief_server.session_reused
    assert thief.session is None or not thief.session.has_ticket
    if thief.session is not None:
        _, again = await connect(server, client, thief.session)
        assert not again.session_reused
    # A thief cannot fall back to TLS 1.2 either once the control speaks TLS 1.3.
    old = ssl.create_default_context()
    old.load_verify_locations(cadata=client.get_ca_certs(binary_form=True)[0])
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError, ExceptionGroup)):
        await connect(server, old, None)
