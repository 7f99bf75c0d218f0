"""ftpfix: a transparent FTP proxy that makes passive mode work behind NAT."""

__version__ = "0.1.0"
