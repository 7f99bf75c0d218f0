"""The probe listener's HTTP handling, in process: transcripts over memory
streams (whole and one byte at a time), and a hypothesis test that only the
module's own HttpError ever escapes the request parser."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from ftpfix.net.health import HttpError, Response, answer, parse_request_head

ROUTES = {"/healthz": lambda: Response(200, b"ok\n"), "/readyz": lambda: Response(503, b"not ready: x\n")}


def exchange(request: bytes, *, one_byte_at_a_time: bool = False) -> bytes:
    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        received = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer, server, ROUTES)
            for offset in range(0, len(request), 1 if one_byte_at_a_time else max(len(request), 1)):
                await client.send_all(request[offset : offset + (1 if one_byte_at_a_time else len(request))])
            await client.send_eof()
            while chunk := await client.receive_some(65536):
                received += chunk
        return received

    return trio.run(main)


TRANSCRIPTS = [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"\r\n\r\nok\n"),
    (b"GET /readyz?verbose=1 HTTP/1.0\n\n", b"HTTP/1.1 503 Service Unavailable\r\n", b"not ready: x\n"),
    (b"HEAD /healthz HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"Connection: close\r\n\r\n"),
    (b"POST /healthz HTTP/1.1\r\n\r\n", b"HTTP/1.1 405 ", b"only GET and HEAD\n"),
    (b"GET /metrics HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 ", b"try /healthz, /readyz\n"),
    (b"GET /healthz HTTP/2.0\r\n\r\n", b"HTTP/1.1 505 ", b""),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"HTTP/1.1 400 ", b"not an HTTP request line\n"),
    (b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n", b"HTTP/1.1 400 ", b"malformed header field\n"),
    (b"GET /healthz HTTP/1.1\r\n", b"HTTP/1.1 400 ", b"ended early\n"),
    (b"GET /healthz HTTP/1.1\r\n" + b"A: b\r\n" * 2000 + b"\r\n", b"HTTP/1.1 431 ", b""),
    (b"", b"", b""),
]


def test_transcripts_whole_and_byte_by_byte() -> None:
    for request, starts, ends in TRANSCRIPTS:
        for one_byte in (False, True):
            if one_byte and len(request) > 2000:
                continue
            response = exchange(request, one_byte_at_a_time=one_byte)
            assert response.startswith(starts) and response.endswith(ends), (request[:50], response)


def test_head_gets_no_body() -> None:
    response = exchange(b"HEAD /readyz HTTP/1.1\r\n\r\n")
    assert response.endswith(b"\r\n\r\n") and b"Content-Length: 13\r\n" in response


@given(st.binary(max_size=300))
def test_only_http_errors_escape_the_parser(head: bytes) -> None:
    try:
        method, path = parse_request_head(head)
    except HttpError as error:
        assert 400 <= error.status < 600
    else:
        assert method.isalpha() and path.startswith("/") and path.isprintable()
