"""``sepal-superlink``: ``flower-superlink`` (same options) that logs refused TLS handshakes.

Flower serves every SuperLink API from one uvicorn/asyncio HTTPS server, and asyncio
drops a failed TLS handshake silently unless the whole event loop runs in debug
mode. An operator then cannot see that a SuperNode was turned away for speaking
plaintext or for distrusting the certificate. The SSL module's public hook
``SSLContext.sslobject_class`` lets us observe each server-side handshake and log
the reason OpenSSL gives (the client's TLS alert), without touching Flower.

It also says at start-up when the SuperLink's own certificate has expired or is about
to, since SuperNodes then refuse it and the SuperLink would otherwise not know why.

And it lets the ``--database`` state wait longer for SQLite locks. Flower sets
``busy_timeout`` to 5 s, after which a request fails with "database is locked"; on a
busy host that can drop the ServerApp's heartbeat and Flower then fails the run ("No
heartbeat received from the task"). Waiting up to 30 s costs nothing when the host is idle.
"""

from __future__ import annotations

import datetime
import ssl
import sys
from logging import ERROR, WARNING
from pathlib import Path

from cryptography import x509
from flwr.common.logger import log

EXPIRY_WARNING_DAYS = 30
SQLITE_BUSY_TIMEOUT_MS = 30_000

# OpenSSL reason -> what it means for a SuperLink
HANDSHAKE_REASONS = {
    "HTTP_REQUEST": "the client spoke plaintext HTTP to this TLS port (SuperNode started "
                    "with --insecure?)",
    "WRONG_VERSION_NUMBER": "the client did not speak TLS (plaintext connection?)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this SuperLink's certificate: its "
                              "--root-certificates is another CA",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the client rejected this SuperLink's certificate as "
                                       "expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected this SuperLink's certificate (host name "
                                   "not in its SANs?)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client rejected this SuperLink's certificate",
}


class LoggedHandshake(ssl.SSLObject):
    """An ``SSLObject`` that logs why a server-side handshake failed, then fails as before."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # waiting for the peer: part of every non-blocking handshake
        except ssl.SSLError as err:
            if self.server_side:
                log(WARNING, "TLS handshake refused: %s [%s]",
                    HANDSHAKE_REASONS.get(err.reason or "", "see the reason"), err.reason)
            raise


def log_refused_handshakes() -> None:
    ssl.SSLContext.sslobject_class = LoggedHandshake


def wait_longer_for_database_locks() -> None:
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(SQLITE_BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS)


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
