"""Unit test: a session's server context, once its control handshake is done,
gives data connections no session of their own (tls.py ``_seal``), and
``resumes_control`` accepts only the control connection's session.

Over in-memory streams, trustme certificates: the attack this pins is
``tests/attacks/test_redteam_tls_stolen_ticket.py`` (a data connection refused
for a full handshake kept the session it was given and resumed it later).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from ftpfix.config import Tls
from ftpfix.net.tls import accept_tls, resumes_control, server_context

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
def test_a_data_connections_own_session_never_passes_for_the_control_ones(tls_setup, version) -> None:
    trio.run(check_binding, *tls_setup, version)


async def check_binding(tls: Tls, client: ssl.SSLContext, version: str) -> None:
    client.maximum_version = VERSIONS[version]
    server = server_context(tls)
    control, _ = await connect(server, client, None, control=True)
    own = control.session
    # A thief's full handshake on a data connection: not a resumption.
    thief, thief_server = await connect(server, client, None)
    assert not resumes_control(server, thief_server)
    # What that handshake gave the thief does not pass for the control session.
    if thief.session is not None:
        _, again = await connect(server, client, thief.session)
        assert not resumes_control(server, again)
    # The control connection's own session does, time after time.
    for _ in range(3):
        _, data = await connect(server, client, own)
        assert resumes_control(server, data)
