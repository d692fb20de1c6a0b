"""The ClientApp module stays light: deployment starts a fresh ClientApp process for
every message, and the secure-aggregation stages other than the masked input only do
cryptography, so importing ``client.app`` must not import the ML stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import PROJECT_ROOT

HEAVY = ("torch", "transformers", "opacus", "peft")


def test_importing_the_client_app_does_not_import_torch_transformers_opacus_or_peft():
    script = ("import json, sys, client.app; "
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, check=True, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert json.loads(completed.stdout.splitlines()[-1]) == []
