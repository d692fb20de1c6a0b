"""The long profile of the reply fuzzer (``tests/fuzz_replies.py``).

    python -m benchmarks.fuzz_uploads [--examples 5000] [--seed 0]

Runs the same properties as ``tests/test_fuzz_uploads.py`` over many more mutated
replies and prints: examples run, accepted and rejected counts, the most common
rejection reasons, the largest decoding peak as a multiple of the model's bytes, and
the time per example. Exits non-zero if any property fails.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import time

from hypothesis import HealthCheck, given, seed, settings

from tests.fuzz_replies import MODEL_BYTES, check_round, mutated_reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    outcomes = []

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_reply())
    def run(case):
        chain, content, _ = case
        outcomes.append(check_round(chain, content))

    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    reasons = collections.Counter(re.sub(r"[-\d.e+]+|'[^']*'", "#", o.reason)[:70]
                                  for o in outcomes if o.reason)
    peak = max(o.peak_bytes for o in outcomes)
    print(f"examples           {len(outcomes)}")
    print(f"accepted           {sum(o.accepted for o in outcomes)}")
    print(f"rejected           {sum(bool(o.reason) for o in outcomes)}")
    print(f"model bytes        {MODEL_BYTES}")
    print(f"largest peak       {peak} bytes = {peak / MODEL_BYTES:.2f} x model")
    print(f"time per example   {1000 * elapsed / max(len(outcomes), 1):.1f} ms")
    print("most common rejections:")
    for reason, count in reasons.most_common(12):
        print(f"  {count:6d}  {reason}")


if __name__ == "__main__":
    main()
