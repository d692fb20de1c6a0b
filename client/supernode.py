"""``sepal-supernode``: ``flower-supernode`` (same options) that says why a connection fails.

Flower retries a failed connection to the SuperLink with the warning "Connection
attempt failed, retrying" and logs the reason only at DEBUG level. A SuperNode that
speaks plaintext to a TLS SuperLink, for one, retries forever without a word on why.
This entry point surfaces that DEBUG record as a warning with the cause and what to
check; everything else is Flower's own SuperNode.
"""

from __future__ import annotations

import logging
import sys

from flwr.common.logger import FLOWER_LOGGER, console_handler

RETRY_RECORD_PREFIX = "Connection attempt failed with exception"


class ConnectionFailureReasons(logging.Handler):
    """Re-emits Flower's DEBUG connection-failure record as a WARNING with a hint."""

    def __init__(self, insecure: bool):
        super().__init__(level=logging.DEBUG)
        self.insecure = insecure

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != logging.DEBUG or not str(record.msg).startswith(RETRY_RECORD_PREFIX):
            return
        error = record.args[0] if isinstance(record.args, tuple) and record.args else record.msg
        warning = logging.makeLogRecord({
            "name": record.name, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "cannot connect to the SuperLink: %s (%s)",
            "args": (error, self.hint(str(error))),
        })
        console_handler.handle(warning)

    def hint(self, error: str) -> str:
        text = error.lower()
        if self.insecure and ("disconnected without sending a response" in text
                              or "connection reset" in text):
            return ("it closed the plaintext connection: this SuperLink requires TLS; start "
                    "without --insecure and with --root-certificates <federation ca.pem>")
        if "connection refused" in text:
            return "nothing listens at that address: is the SuperLink running?"
        if "name or service not known" in text or "nodename nor servname" in text:
            return "the SuperLink's host name does not resolve"
        return "retrying"


ADDS = [
    "says why a connection to the SuperLink fails (TLS required, nothing listening, "
    "host name not resolving) instead of retrying silently",
]


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    from sepal.cli import wrapper_preamble

    wrapper_preamble(sys.argv[1:], "sepal-supernode", "flower-supernode", ADDS)
    FLOWER_LOGGER.addHandler(ConnectionFailureReasons(insecure="--insecure" in sys.argv[1:]))
    flower_supernode()


if __name__ == "__main__":
    main()
