"""An in-process Grid: each message goes to the real ClientApp, called in this process.

For tests that drive the real ServerApp code (``server.app.serve``: strategy from the
run config, ``Federation``, validation, checkpoints) with real Flower strategies and
real client replies, without starting Flower's runtime, which costs 40+ s per run on
this machine (SuperLink, Ray or one ClientApp process per message). It is not the
Flower runtime: the simulation and deployment tests cover that.

Like Flower's runtime it sets the process's TaskIdentity, keeps one ``Context`` per node for the whole run
(so ``context.state`` persists), stamps message ids, turns a ClientApp exception into
an error reply, and hands replies back in arrival order, here the reverse of the
sending order, so code that depends on reply order shows up.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app

PROJECT_ROOT = Path(__file__).resolve().parents[1]

Tamper = Callable[[Message], Message]


def app_run_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """The run config Flower would hand the apps: pyproject defaults + overrides."""
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        defaults = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    unknown = set(overrides) - set(defaults)
    assert not unknown, f"Flower would reject undeclared run-config keys {unknown}"
    return {**defaults, **overrides}


class InProcessGrid(Grid):
    def __init__(self, run_config: dict[str, Any], num_nodes: int):
        # ids as a SuperLink hands them out: large, and listed in no particular order
        self.node_ids = [7_000_000 + 1_009 * k for k in reversed(range(num_nodes))]
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id,
                             node_config={"partition-id": i, "num-partitions": num_nodes},
                             state=RecordDict(), run_config=run_config)
            for i, node_id in enumerate(sorted(self.node_ids))
        }
        self.tamper: dict[int, Tamper] = {}  # node id -> what a faulty client sends instead
        self.sent: list[Message] = []     # every instruction delivered
        self.replies: list[Message] = []  # every reply, as the server received it
        self._replies: dict[str, Message] = {}
        self._run = SimpleNamespace(run_id=1)
        # what Flower's ServerApp runtime sets in its process before the app runs
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    def partition_of(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def node_of(self, partition_id: int) -> int:
        return next(n for n in self.contexts if self.partition_of(n) == partition_id)

    @property
    def run(self) -> Any:
        return self._run

    def set_run(self, run: Any) -> None:
        self._run = run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; the reply waits to be pulled."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            self._replies[message.metadata.message_id] = self._deliver(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return list(reversed(list(self.pull_messages(self.push_messages(messages)))))

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        try:
            reply = client_app(message, self.contexts[node])
        except Exception as err:  # the runtime reports it as an error reply
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  f"{type(err).__name__}: {err}"), reply_to=message)
        if node in self.tamper and not reply.has_error():
            reply = self.tamper[node](reply)
        self.replies.append(reply)
        return reply


def server_context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config=run_config)


# The smallest run that still trains: tiny BERT, 16 SST-2 sentences per node (one batch).
TINY_INPROCESS = {
    "model": "tiny-bert",
    "test-split": "dev",
    "max-test-examples": 32,
    "num-server-rounds": 2,
    "max-seq-length": 16,
    "batch-size": 16,
    "learning-rate": 1e-3,
}


def run_inprocess(tmp_path: Path, overrides: dict[str, Any], num_nodes: int = 3,
                  tamper: dict[int, Tamper] | None = None,
                  name: str = "run") -> tuple[Path, InProcessGrid]:
    """Run ``server.app.serve`` against ``num_nodes`` in-process ClientApps."""
    from server.app import serve
    from tests.conftest import SST2

    run_config = app_run_config({
        **TINY_INPROCESS, "dataset": str(SST2), "max-train-examples": 16 * num_nodes,
        "min-train-nodes": min(2, num_nodes), "min-available-nodes": num_nodes,
        "output-dir": str(tmp_path / "outputs"), "run-name": name, **overrides})
    grid = InProcessGrid(run_config, num_nodes)
    grid.tamper = {grid.node_of(partition): fn for partition, fn in (tamper or {}).items()}
    return serve(grid, server_context(run_config)), grid
