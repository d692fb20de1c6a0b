"""The deployment's log helpers, on real certificates and records."""

from __future__ import annotations

import datetime
import logging
import time
from collections import OrderedDict

import numpy as np
from flwr.app import Metadata
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from client.supernode import ConnectionFailureReasons
from server import pki
from server.progress import round_line
from server.provision import FederationSpec, provision
from server.superlink import check_certificate_expiry
from server.uploads import decode_replies


def test_superlink_logs_its_own_expired_certificate(tmp_path, caplog):
    spec = FederationSpec.from_mapping({"name": "f", "superlink": "127.0.0.1:9093",
                                        "institutions": {"a": {}}})
    provision(spec, tmp_path / "fed")
    fed = tmp_path / "fed"
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = pki.issue_server_certificate(
        pki.load_private_key(fed / "ca" / "ca.key"), pki.load_certificate(fed / "ca" / "ca.pem"),
        pki.new_key(), ["x.example.org"], now - datetime.timedelta(days=10),
        now - datetime.timedelta(days=1))
    (tmp_path / "old.pem").write_bytes(pki.certificate_pem(cert))
    with caplog.at_level(logging.INFO, logger="flwr"):
        check_certificate_expiry(["--ssl-certfile", str(tmp_path / "old.pem")])
        check_certificate_expiry([f"--ssl-certfile={fed / 'operator' / 'superlink.pem'}"])
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "old.pem expired on" in caplog.records[0].getMessage()


def test_supernode_explains_a_plaintext_refusal():
    reasons = ConnectionFailureReasons(insecure=True)
    assert "requires TLS" in reasons.hint("Server disconnected without sending a response.")
    assert "is the SuperLink running" in reasons.hint("[Errno 111] Connection refused")
    assert ConnectionFailureReasons(insecure=False).hint(
        "Server disconnected without sending a response.") == "retrying"


def test_round_line_has_counts_accuracy_epsilon_bytes_and_seconds():
    record = {"round": 2, "clients": 1, "sampled": 3, "failed": 1, "rejected": 0,
              "timed_out": 1, "accuracy": 0.8125, "macro_f1": 0.5,
              "bytes_up_per_client": {"1": 2_000_000},
              "bytes_down_per_client": {"1": 2_000_000, "2": 2_000_000, "3": 2_000_000},
              "epsilon_per_client": {"1": 1.5, "2": 2.25}, "user_level_epsilon": 0.75,
              "late_discarded": 1, "refused": 1, "wall_time_s": 12.34}
    assert round_line(record, 3) == (
        "round 2/3 |  1/3  answered |  2 failed (1 timed out) |  1 refused | accuracy 0.8125 | "
        "macro-F1 0.5000 | eps max   2.25 (sample-level) | user-level eps   0.75 | "
        "up     2.00 MB | down     6.00 MB |   12.3s | 1 late repl(ies) discarded")
    later = {**record, "round": 3, "clients": 3, "wall_time_s": 3.0, "late_discarded": 0}
    assert round_line(later, 3).index("accuracy") == round_line(record, 3).index("accuracy")


def test_a_node_the_superlink_answers_for_is_failed_under_its_own_id():
    """Flower writes "Node Unavailable" for a node whose heartbeats stopped, with the
    SuperLink as sender: the round must still count that node, once, as failed."""
    sent = Metadata(run_id=1, message_id="instruction-1", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id="2", created_at=time.time(), ttl=3600.0,
                    message_type="train")
    reply = create_message_error_unavailable_res_message(sent, "node_unavail")
    assert reply.metadata.src_node_id != 7

    decoded = decode_replies([reply], OrderedDict(w=np.zeros(2, np.float32)),
                             instruction_nodes={"instruction-1": 7})
    assert list(decoded.failed) == [7] and "Node Unavailable" in decoded.failed[7]
    assert not decoded.accepted
