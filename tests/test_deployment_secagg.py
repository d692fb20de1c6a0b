"""An authenticated secure-aggregation round between provisioned institutions.

``sepal-provision`` issues each institution its SecAgg identity and the roster; real
``flower-superlink`` / ``flower-supernode`` processes (TLS, SuperNode authentication)
run one round in which every ClientApp process signs its keys and survivor set and
verifies the other institutions' signatures against the roster its node config names.
"""

from __future__ import annotations

import csv
import re

from server.provision import FederationSpec, provision
from simulations.deployment import LocalDeployment
from simulations.processes import free_port
from tests.conftest import TINY_RUN, read_metrics

INSTITUTIONS = ("alpha", "beta", "gamma")
ROWS = 32


def test_provisioned_institutions_sign_and_verify_a_secure_round(tmp_path, sst2):
    with (sst2 / "train_sentences.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    institutions = {}
    for i, name in enumerate(INSTITUTIONS):
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        with (folder / "train.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows[i * ROWS:(i + 1) * ROWS])
        (folder / "label_names.json").write_text('["negative", "positive"]')
        institutions[name] = {"data-path": str(folder), "device": "cpu", "dp-max-epsilon": 0.0}
    federation = tmp_path / "trio"
    provision(FederationSpec.from_mapping({"name": "trio",
                                           "superlink": f"127.0.0.1:{free_port()}",
                                           "institutions": institutions}), federation)

    config = {**TINY_RUN, "num-server-rounds": 1, "min-train-nodes": 3,
              "min-available-nodes": 3, "round-timeout": 600.0, "secure-aggregation": True,
              "secagg-stage-timeout": 600.0, "output-dir": str(tmp_path / "outputs"),
              "run-name": "secure"}
    with LocalDeployment(tmp_path / "deployment", federation=federation) as deployment:
        deployment.start_superlink()
        deployment.register_institutions()
        for name in INSTITUTIONS:
            deployment.start_institution(name)
        folder = deployment.run(config, timeout=1500)
        run_log = deployment.log_text("flwr-run")

    secure = read_metrics(folder)[1]
    assert secure["secagg"]["aborted"] is None, secure["secagg"]["aborted"]
    assert secure["clients"] == 3 and secure["examples"] == 3 * ROWS
    assert set(secure["secagg"]["stage_seconds"]) == {
        "setup", "share-keys", "masked-input", "consistency", "unmask"}
    assert secure["secagg"]["accusations"] == {} and secure["secagg"]["bad_shares"] == {}
    assert not re.search(r"dropped at|failed at", run_log), run_log[-3000:]
