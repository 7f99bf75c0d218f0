"""Python's ftplib as a command-line client, so it can run in a namespace.

usage: ftplib_client.py get|put HOST PORT USER PASSWORD REMOTE LOCAL pasv|port|epsv|eprt

EPSV and EPRT work only on IPv6 connections, where ftplib picks them itself.
"""

import ftplib
import socket
import sys


def main(direction, host, port, user, password, remote, local, mode):
    ftp = ftplib.FTP(timeout=60)
    # ftplib otherwise ignores the 227's address and dials the control peer.
    ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(host, int(port))
    ftp.login(user, password)
    if mode in ("port", "eprt"):
        ftp.set_pasv(False)
    if mode in ("epsv", "eprt") and ftp.af != socket.AF_INET6:
        sys.exit(f"ftplib_client: ftplib uses {mode.upper()} only over IPv6")
    if direction == "get":
        with open(local, "wb") as file:
            ftp.retrbinary(f"RETR {remote}", file.write, blocksize=1 << 16)
    else:
        with open(local, "rb") as file:
            ftp.storbinary(f"STOR {remote}", file, blocksize=1 << 16)
    ftp.quit()


if __name__ == "__main__":
    main(*sys.argv[1:])
