"""``sepal-superlink``: ``flower-superlink`` (same options) that logs refused TLS handshakes.

Flower serves every SuperLink API from one uvicorn/asyncio HTTPS server, and asyncio
drops a failed TLS handshake silently unless the whole event loop runs in debug
mode. An operator then cannot see that a SuperNode was turned away for speaking
plaintext or for distrusting the certificate, so the SuperLink's TLS contexts log
each refused handshake with the reason OpenSSL gives (the client's TLS alert).

It also says at start-up when the SuperLink's own certificate has expired or is about
to, since SuperNodes then refuse it and the SuperLink would otherwise not know why.

And it lets the ``--database`` state wait longer for SQLite locks than Flower's 5 s.
Both changes to Flower's behaviour live in ``server/flower_patches.py``.
"""

from __future__ import annotations

import datetime
import sys
from logging import ERROR, WARNING
from pathlib import Path

from cryptography import x509
from flwr.common.logger import log

from server.flower_patches import (
    SQLITE_BUSY_TIMEOUT_MS,
    log_refused_handshakes,
    wait_longer_for_database_locks,
)

EXPIRY_WARNING_DAYS = 30


def check_certificate_expiry(argv: list[str], now: datetime.datetime | None = None) -> None:
    """Log the validity of the certificate given with ``--ssl-certfile``, if any."""
    path = _option(argv, "--ssl-certfile")
    if path is None or not Path(path).is_file():
        return  # flower-superlink reports the missing file itself
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    now = now or datetime.datetime.now(datetime.timezone.utc)
    expires = cert.not_valid_after_utc
    if expires <= now:
        log(ERROR, "SuperLink certificate %s expired on %s: every SuperNode will refuse it; "
            "re-issue it (docs/deployment.md)", path, expires.isoformat())
    elif cert.not_valid_before_utc > now:
        log(ERROR, "SuperLink certificate %s is not valid before %s", path,
            cert.not_valid_before_utc.isoformat())
    elif expires - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        log(WARNING, "SuperLink certificate %s expires on %s", path, expires.isoformat())


def _option(argv: list[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


ADDS = [
    "logs why a SuperNode's TLS handshake was refused (plaintext, unknown CA, "
    "expired or mismatched certificate)",
    "says at start-up when its own certificate (--ssl-certfile) has expired or expires "
    f"within {EXPIRY_WARNING_DAYS} days",
    f"waits up to {SQLITE_BUSY_TIMEOUT_MS // 1000} s for SQLite locks on --database "
    "(Flower: 5 s), so a busy host does not fail runs",
]


def main() -> None:
    from flwr.superlink.cli import flower_superlink

    from sepal.cli import wrapper_preamble

    wrapper_preamble(sys.argv[1:], "sepal-superlink", "flower-superlink", ADDS)
    log_refused_handshakes()
    wait_longer_for_database_locks()
    check_certificate_expiry(sys.argv[1:])
    flower_superlink()


if __name__ == "__main__":
    main()
