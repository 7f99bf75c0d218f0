"""A scripted FTP backend for the reply formats no packaged server sends.

Real servers agree on "227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)."; the
field has more: no parentheses, "=", leading zeros, the numbers on a
continuation line, 229 with other delimiters, EPSV answered with a 227, and
servers that do not know EPSV at all. This backend answers with exactly the
text a test gives it, and serves a real file over a real data connection,
so a real client can check the whole transfer.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

#: Template variables: {h} is "127,0,0,1", {p} is "p1,p2", {p1} {p2} and
#: {port} are the data port.
PASV_DEFAULT = "227 Entering Passive Mode ({h},{p})."


@dataclass
class FakeBackend:
    payload: bytes
    pasv: str = PASV_DEFAULT
    epsv: str | None = "229 Entering Extended Passive Mode (|||{port}|)"
    syst: str = "215 UNIX Type: L8"
    greeting: str = "220 fake legacy FTP server"
    host: str = "127.0.0.1"
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)

    def start(self) -> FakeBackend:
        self._listener = socket.create_server((self.host, 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        data_listener: socket.socket | None = None
        with conn, conn.makefile("rb") as lines:

            def say(text: str) -> None:
                conn.sendall(text.replace("\n", "\r\n").encode() + b"\r\n")

            def open_data(template: str) -> None:
                nonlocal data_listener
                data_listener = socket.create_server((self.host, 0))
                port = data_listener.getsockname()[1]
                say(
                    template.format(
                        h=self.host.replace(".", ","),
                        p=f"{port >> 8},{port & 255}",
                        p1=port >> 8,
                        p2=port & 255,
                        port=port,
                    )
                )

            def transfer(action: Callable[[socket.socket], None]) -> None:
                if data_listener is None:
                    say("425 Use PASV first.")
                    return
                say("150 Opening BINARY mode data connection.")
                data, _ = data_listener.accept()
                with data:
                    action(data)
                data_listener.close()
                say("226 Transfer complete.")

            def receive_into(name: str) -> Callable[[socket.socket], None]:
                def action(data: socket.socket) -> None:
                    chunks = []
                    while chunk := data.recv(1 << 16):
                        chunks.append(chunk)
                    self.uploads[name] = b"".join(chunks)

                return action

            say(self.greeting)
            for raw in lines:
                self.received.append(raw)
                verb, _, argument = raw.strip().decode("latin-1").partition(" ")
                verb = verb.upper()
                if verb == "USER":
                    say("331 Password required.")
                elif verb == "PASS":
                    say("230 Logged in.")
                elif verb == "SYST":
                    say(self.syst)
                elif verb in ("TYPE", "MODE", "STRU", "NOOP"):
                    say("200 OK.")
                elif verb == "PWD":
                    say('257 "/" is the current directory.')
                elif verb == "SIZE":
                    say(f"213 {len(self.payload)}")
                elif verb == "PASV":
                    open_data(self.pasv)
                elif verb == "EPSV" and self.epsv is not None:
                    open_data(self.epsv)
                elif verb == "RETR":
                    transfer(lambda data: data.sendall(self.payload))
                elif verb == "STOR":
                    transfer(receive_into(argument))
                elif verb == "QUIT":
                    say("221 Goodbye.")
                    return
                else:
                    say(f"500 {verb} not understood.")
