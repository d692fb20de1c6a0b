"""The ClientApp module stays light: deployment starts a fresh ClientApp process for
every message, and the secure-aggregation stages other than the masked input only do
cryptography, so importing ``client.app`` must not import the ML stack. Neither app
imports the test harness (``testing/``), so no setting can make a client misbehave."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import PROJECT_ROOT

HEAVY = ("torch", "transformers", "opacus", "peft")


def _loaded(imports: str, wanted: str) -> list[str]:
    """Modules in ``sys.modules`` matching ``wanted`` after a fresh interpreter runs ``imports``."""
    script = (f"import json, sys; {imports}; "
              f"print(json.dumps(sorted(m for m in sys.modules if {wanted})))")
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, check=True, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    return json.loads(completed.stdout.splitlines()[-1])


def test_importing_the_client_app_does_not_import_torch_transformers_opacus_or_peft():
    assert _loaded("import client.app", f"m in {HEAVY!r}") == []


def test_the_apps_never_import_the_test_harness():
    apps = ("import client.app, client.training_round, server.app, sepal.docs_reference; "
            "sepal.docs_reference.config_sections()")
    assert _loaded(apps, "m.split('.')[0] in ('testing', 'tests')") == []
    assert _loaded("import testing.grid", "m.split('.')[0] == 'testing'") != []
