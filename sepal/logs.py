"""Logging for Sepal's processes: Sepal's lines at INFO, Flower's once, no library noise.

Flower logs through its own ``flwr`` logger and console handler. Left to propagate,
its records would print a second time through any handler on the root logger (importing
Opacus installs one), DEBUG included, since Flower's logger level is DEBUG. Transformers
prints a load report for every model whose head is newly initialised and a progress bar
for every save; neither says anything a run's operator can act on.
"""

from __future__ import annotations

import logging
import re
import sys

SEPAL_LOGGER = "sepal"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _LevelFormatter(logging.Formatter):
    """Flower's console layout without colours: ``INFO :      message``."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname} : {' ' * (8 - len(record.levelname))}{message}"


class _DropReplyCount(logging.Filter):
    """Flower's strategies log how many replies ``aggregate_train`` received. When the
    round loop hands them one summed reply (streaming or secure aggregation) that count
    reads 1; Sepal's round line reports the sites that answered, failed and were refused."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("aggregate_train: Received")


def configure(level: int = logging.INFO) -> None:
    """Route Sepal's, Flower's and third-party records to one place each (idempotent)."""
    from flwr.common.logger import FLOWER_LOGGER, update_console_handler

    colored = _is_terminal(sys.stdout)
    update_console_handler(colored=colored)
    FLOWER_LOGGER.propagate = False
    if not any(isinstance(f, _DropReplyCount) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_DropReplyCount())

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_sepal", False) or _is_default_stream_handler(handler):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LevelFormatter())
    handler.setLevel(level)
    handler._sepal = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(SEPAL_LOGGER).setLevel(level)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_libraries()


def quiet_libraries() -> None:
    """No load reports or progress bars from transformers, datasets and the hub client."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _is_default_stream_handler(handler: logging.Handler) -> bool:
    """A plain stderr/stdout handler such as ``logging.basicConfig`` (Opacus) installs."""
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (
        sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
