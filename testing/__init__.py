"""Test harness: drive the real ServerApp and ClientApp code in one process.

``testing.grid`` is a Flower ``Grid`` that hands each message to a ClientApp in this
process; ``testing.attacks`` turns an honest client into a poisoning one by rewriting
its reply on the way to the server. Tests and benchmarks import this package; the
ClientApp and the ServerApp never do, so no setting of a run can make a client
misbehave.

It is a top-level package, not part of ``sepal/``: it imports ``client`` and ``server``
(it runs both), which the shared core must never do, and the ServerApp imports every
module under ``sepal/`` to list the run-config sections it records. It is not part of
``simulations/`` either, which holds what users run.
"""
