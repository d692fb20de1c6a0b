"""Errors of the secure-aggregation protocol."""

from __future__ import annotations


class SecAggError(ValueError):
    """A protocol message, key, share or vector that fails a check; names the defect."""


class RoundAborted(RuntimeError):
    """The round cannot finish without revealing less than the threshold allows.

    Raised by the server before anything that could reveal a partial sum; the
    masked sum it holds stays masked and the global model is kept.
    """
