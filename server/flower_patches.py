"""Changes to Flower 1.42.0's behaviour for which its API offers no option.

Each patch is applied explicitly by the code that needs it, never on import, and
tests/test_flower_patches.py checks that the upstream behaviour it changes is still
there in the installed Flower: an upgrade that changes it fails that test, naming the
patch to revisit or drop.

- :func:`log_refused_handshakes` (``sepal-superlink``): asyncio drops a failed TLS
  handshake silently unless the event loop runs in debug mode, so Flower's SuperLink
  never says that it turned a SuperNode away. The contexts uvicorn builds for serving
  (Flower serves every SuperLink API from one uvicorn server) get an ``SSLObject``
  class that logs OpenSSL's reason; every other ``ssl.SSLContext`` of the process is
  left as it is.
- :func:`wait_longer_for_database_locks` (``sepal-superlink``): Flower gives SQLite
  locks ``busy_timeout`` = 5 s, after which a request fails with "database is
  locked"; on a busy host that can drop the ServerApp's heartbeat and Flower then fails
  the run ("No heartbeat received from the task"). 30 s costs nothing when idle.
- :class:`ServerSideAdaptiveClipping`, :class:`ClientSideAdaptiveClipping`
  (``server/central_dp.py``): Flower's adaptive-clipping wrappers move the clipping
  norm the wrong way (see :class:`ClipNormTowardsTargetQuantile`).
"""

from __future__ import annotations

import functools
import math
import ssl
from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)

FLOWER_VERSION = "1.42.0"  # the Flower release every patch here was written against
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
    """Every TLS context uvicorn creates from here on logs refused server handshakes.

    uvicorn builds its server context with ``uvicorn.config.create_ssl_context``; the
    wrapper sets ``sslobject_class`` on that context only (``ssl``'s public hook,
    per instance), so client contexts and other servers in the process are unchanged.
    """
    import uvicorn.config

    create = uvicorn.config.create_ssl_context
    if getattr(create, "logs_refused_handshakes", False):
        return

    @functools.wraps(create)
    def create_logging_context(*args, **kwargs) -> ssl.SSLContext:
        context = create(*args, **kwargs)
        context.sslobject_class = LoggedHandshake
        return context

    create_logging_context.logs_refused_handshakes = True
    uvicorn.config.create_ssl_context = create_logging_context


def wait_longer_for_database_locks() -> None:
    """SQLite connections opened from here on wait ``SQLITE_BUSY_TIMEOUT_MS`` for a lock."""
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(SQLITE_BUSY_TIMEOUT_MS) if name == "busy_timeout" else value)
        for name, value in sql_mixin.SQLITE_PRAGMAS)


class ClipNormTowardsTargetQuantile:
    """Flower's adaptive wrappers feed the fraction of *clipped* updates into Andrew
    et al.'s update ``C <- C exp(-lr (b - gamma))``, whose ``b`` is the fraction *not*
    clipped: with most updates clipped the norm shrinks further and diverges to 0. This
    applies the rule with Flower's meaning of ``target_clipped_quantile`` (the share of
    updates that should be clipped): ``C <- C exp(lr (clipped - target))``."""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(
            self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class ServerSideAdaptiveClipping(ClipNormTowardsTargetQuantile,
                                 DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the norm moving the right way."""


class ClientSideAdaptiveClipping(ClipNormTowardsTargetQuantile,
                                 DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the norm moving the right way."""
