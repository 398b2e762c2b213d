"""pmond's entry point (`python -m pmon2.daemon`, and the `pmond` script).

It keeps `ssl` out before asyncio is imported: asyncio only wants it for TLS, which a daemon on a Unix
socket never speaks, and loading OpenSSL costs about 4 MB of resident memory, a fifth of pmond's.
"""

import sys


def run() -> int:
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    from pmon2.daemon.main import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
