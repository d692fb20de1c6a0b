"""Run the ServerApp and the ClientApps in one process, without Flower's runtime.

``run_in_process(run_config, num_nodes)`` calls ``server.app.serve`` with a Grid that
hands each message to the real ClientApp (``client.app.app``) in this process, one
after the other. Like Flower's runtime it sets the process's TaskIdentity, keeps one
``Context`` per node for the whole run (so ``context.state`` persists), stamps message
ids and turns a ClientApp exception into an error reply; replies come back in the
reverse of the sending order, so code that depends on arrival order shows up.

What it is for: tests that drive the real server and client code with real Flower
strategies (a Flower run costs 40+ s here: SuperLink, Ray or one ClientApp process
per message), and CPU experiments on a machine too busy for Ray to start. What it is
not: Flower's runtime (no gRPC, no timeouts, no concurrency); the simulation and
deployment tests cover that.
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
    if unknown:
        raise ValueError(f"run config keys {sorted(unknown)} are not declared in "
                         "pyproject.toml (Flower would reject them)")
    return {**defaults, **overrides}


class InProcessGrid(Grid):
    """Nodes with partition ids 0..n-1; ``keep_messages`` records every instruction
    (``sent``) and reply (``replies``) for tests to inspect."""

    def __init__(self, run_config: dict[str, Any], num_nodes: int, keep_messages: bool = False):
        # ids as a SuperLink hands them out: large, and listed in no particular order
        self.node_ids = [7_000_000 + 1_009 * k for k in reversed(range(num_nodes))]
        self.contexts = {
            node_id: Context(run_id=1, node_id=node_id,
                             node_config={"partition-id": i, "num-partitions": num_nodes},
                             state=RecordDict(), run_config=run_config)
            for i, node_id in enumerate(sorted(self.node_ids))
        }
        self.tamper: dict[int, Tamper] = {}  # node id -> what a faulty client sends instead
        self.keep_messages = keep_messages
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
            if self.keep_messages:
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
        if self.keep_messages:
            self.replies.append(reply)
        return reply


def server_context(run_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config=run_config)


def run_in_process(run_config: dict[str, Any], num_nodes: int,
                   tamper: dict[int, Tamper] | None = None,
                   keep_messages: bool = False) -> tuple[Path, InProcessGrid]:
    """Serve one run to ``num_nodes`` in-process ClientApps (partitions 0..n-1);
    ``tamper`` maps a partition to what that faulty client sends instead of its reply."""
    from server.app import serve

    grid = InProcessGrid(run_config, num_nodes, keep_messages)
    grid.tamper = {grid.node_of(partition): fn for partition, fn in (tamper or {}).items()}
    return serve(grid, server_context(run_config)), grid
