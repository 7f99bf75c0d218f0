import subprocess
import sys


def test_the_protocol_core_does_no_io() -> None:
    """ftpfix.protocol must not import trio, socket or structlog (STYLE.md)."""
    code = (
        "import sys, ftpfix.protocol, ftpfix.ports\n"
        "bad = {'trio', 'socket', 'structlog', 'asyncio', 'selectors'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
