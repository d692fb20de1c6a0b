"""The run's settings as this ClientApp process sees them: parsed once per run.

A SuperNode's ClientApp may serve several runs and, in simulation, one process serves
many messages; the parse is cached by run id and the run config's content.
"""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import Context

from sepal.settings import Settings


def run_settings(context: Context) -> Settings:
    """The :class:`Settings` of ``context``'s run (raises ConfigError on a bad setting)."""
    return _parsed(context.run_id, tuple(sorted(context.run_config.items())))


@functools.lru_cache(maxsize=8)
def _parsed(run_id: int, items: tuple[tuple[str, Any], ...]) -> Settings:
    return Settings.from_mapping(dict(items))
