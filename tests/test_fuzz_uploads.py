"""Fuzzed replies: none escapes as an exception, blows up memory or stops the honest ones.

The CI profile (``SEPAL_FUZZ_EXAMPLES``, default 300); ``benchmarks/fuzz_uploads.py``
runs the same properties for longer and prints the figures.
"""

from __future__ import annotations

import os

from flwr.app import Array
from flwr.common.constant import SType
from hypothesis import HealthCheck, given, settings

from sepal import wire
from tests.fuzz_replies import (
    CHAINS,
    FUZZED_NODE,
    GLOBAL,
    check_round,
    mutated_reply,
    npy_claiming,
    reply_content,
)

CI_EXAMPLES = int(os.environ.get("SEPAL_FUZZ_EXAMPLES", "300"))


@settings(max_examples=CI_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_reply())
def test_mutated_replies_are_accepted_or_rejected_never_raised(case):
    chain, content, _ = case
    check_round(chain, content)


def test_every_honest_chain_is_accepted_within_the_memory_bound():
    for chain in CHAINS:
        outcome = check_round(chain, reply_content(FUZZED_NODE, chain))
        assert outcome.accepted, (chain, outcome.reason)


def test_a_header_claiming_a_trillion_elements_is_rejected_without_allocating():
    content = reply_content(FUZZED_NODE, "dense")
    name = next(iter(GLOBAL))
    content[wire.UPDATE_KEY][name] = Array(
        dtype="float32", shape=(4,), stype=SType.NUMPY,
        data=npy_claiming((10**12,), "float32", b"\0" * 16))
    outcome = check_round("dense", content)
    assert not outcome.accepted and "declares 1000000000000 x float32" in outcome.reason
