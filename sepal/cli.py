"""What every Sepal command line shares: ``--version`` and, for the commands that wrap
a Flower one, a ``--help`` that says what the wrapper adds."""

from __future__ import annotations

import sys


def version_text() -> str:
    """``sepal X (flwr Y)``: the two versions a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sepal = version("sepal")
    except PackageNotFoundError:
        sepal = "unknown"
    return f"sepal {sepal} (flwr {version('flwr')})"


def wrapper_preamble(argv: list[str], prog: str, flower_prog: str, adds: list[str]) -> None:
    """Answer ``--version``; before ``--help``, print what ``prog`` adds to ``flower_prog``
    (whose own options and help follow)."""
    if "--version" in argv or "-V" in argv:
        print(f"{prog}: {version_text()}")
        raise SystemExit(0)
    if "--help" in argv or "-h" in argv:
        print(f"{prog}: {flower_prog} with the same options, plus:")
        for line in adds:
            print(f"  - {line}")
        print(f"\n{flower_prog}'s options follow.\n")
        sys.stdout.flush()
