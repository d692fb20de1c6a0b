"""A Flower ``Grid`` whose nodes are ClientApps in this process.

Written here because Flower's own in-memory Grid needs a SuperLink state and runs
ClientApps through Ray or separate processes; this one calls the ClientApp directly,
which makes a protocol or a strategy testable in seconds and lets a test see and alter
every message.

Like Flower's runtime it stamps message ids, keeps one ``Context`` per node for the
whole run (``context.state`` persists across messages, as on a SuperNode), turns a
ClientApp exception into an error reply and, with ``serialize`` (the default), sends
every content through Flower's protobuf serialization both ways, so what a client
receives is what would arrive over gRPC. Unlike it: no gRPC, no concurrency, no clock.

Faithful to Flower's ``Grid`` contract:

* ``push_messages`` accepts each valid instruction for a known node and returns its
  id; an invalid one or one for an unknown node is refused (logged, no id), as the
  SuperLink does;
* ``pull_messages(ids)`` returns the replies available for those ids, each once. A
  node works on an instruction when a pull asks for it (so memory holds only the
  replies pulled); ``replies_per_pull`` caps how many one pull returns, to exercise
  servers that consume replies as they arrive;
* ``send_and_receive`` pushes, then pulls until every instruction is answered or
  nothing more can arrive. ``timeout`` is accepted and has no effect: without a clock
  an instruction is answered unless a hook lost it.

Hooks inject faults: ``on_instruction`` (at push, on the copy that crossed the wire)
and ``on_reply`` (before the reply is pulled) return the message to deliver, possibly
altered, or None to lose it. A lost
instruction is never answered; a reply hook's replacement is returned for the
instruction it answers, whatever its own ``reply_to`` says.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

PROJECT_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("sepal.testing")

# A hook returns the message to deliver (possibly altered), or None to lose it.
Hook = Callable[[Message], Message | None]


@dataclasses.dataclass
class Exchange:
    """One ``push_messages`` call: who computed how long, and the wire's cost."""

    message_types: set[str] = dataclasses.field(default_factory=set)
    client_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    wire_seconds: float = 0.0  # protobuf serialization both ways (not the protocol's work)


class InProcessGrid(Grid):
    """Nodes ``node_configs`` (node id -> node config) served by ``app``.

    ``reverse_replies`` returns the replies of a pull in the reverse of the sending order,
    so code that depends on arrival order shows up. ``keep_messages`` records every
    instruction as it went out (``sent``) and every reply as pulled (``replies``).
    ``clock`` times the clients' and the wire's work (``exchanges``), e.g.
    ``time.process_time`` for CPU work on a shared machine; ``bytes_up`` / ``bytes_down``
    add up each node's serialized contents.
    """

    def __init__(self, app: ClientApp, node_configs: Mapping[int, Mapping[str, Any]],
                 run_config: Mapping[str, Any], *, run_id: int = 1, serialize: bool = True,
                 reverse_replies: bool = False, replies_per_pull: int | None = None,
                 keep_messages: bool = False, clock: Callable[[], float] = time.perf_counter):
        if replies_per_pull is not None and replies_per_pull < 1:
            raise ValueError(f"replies_per_pull must be >= 1 or None, got {replies_per_pull}")
        self.app = app
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config=dict(config),
                          state=RecordDict(), run_config=dict(run_config))
            for node, config in node_configs.items()
        }
        self.serialize = serialize
        self.reverse_replies = reverse_replies
        self.replies_per_pull = replies_per_pull
        self.keep_messages = keep_messages
        self.clock = clock
        self.on_instruction: Hook | None = None
        self.on_reply: Hook | None = None
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.exchanges: list[Exchange] = []
        self.bytes_up: dict[int, int] = {}
        self.bytes_down: dict[int, int] = {}
        self._pending: dict[str, tuple[Message, Exchange]] = {}  # id -> (instruction, its push)
        self._run = Run.create_empty(run_id)
        # what Flower's ServerApp runtime sets in its process before the app runs
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def partition_of(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    def node_of(self, partition_id: int) -> int:
        for node, context in self.contexts.items():
            if context.node_config.get("partition-id") == partition_id:
                return node
        raise KeyError(f"no node has partition-id {partition_id}")

    @property
    def run(self) -> Run:
        return self._run

    def set_run(self, run: Run) -> None:
        self._run = run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        exchange = Exchange()
        self.exchanges.append(exchange)
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            defect = self._defect(message)
            if defect:
                log.error("instruction refused: %s", defect)
                continue
            message_id = message.metadata.message_id
            ids.append(message_id)
            # the instruction leaves the server here: later changes to the server's object
            # do not reach the node, and a hook alters only this node's copy
            message = Message(content=self._wire(message.content, message.metadata.dst_node_id,
                                                 self.bytes_down, exchange),
                              metadata=message.metadata)
            if self.on_instruction is not None:
                message = self.on_instruction(message)
            if message is None:  # lost on the way: never answered
                continue
            if self.keep_messages:
                self.sent.append(message)
            self._pending[message_id] = (message, exchange)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        requested = set(message_ids)
        wanted = [i for i in self._pending if i in requested]
        if self.reverse_replies:
            wanted.reverse()
        replies = []
        for message_id in wanted:
            reply = self._deliver(*self._pending.pop(message_id))
            if self.on_reply is not None:
                reply = self.on_reply(reply)
            if reply is None:
                continue
            if self.keep_messages:
                self.replies.append(reply)
            replies.append(reply)
            if len(replies) == self.replies_per_pull:
                break
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        waiting = list(self.push_messages(messages))
        replies: list[Message] = []
        while waiting:
            pulled = list(self.pull_messages(waiting))
            if not pulled:  # what is still waiting was lost
                break
            replies += pulled
            waiting = [i for i in waiting if i in self._pending]
        return replies

    def _defect(self, message: Message) -> str:
        metadata = message.metadata
        if metadata.reply_to_message_id or metadata.delivered_at or not metadata.ttl > 0:
            return (f"message {metadata.message_id} is not a fresh instruction (reply_to "
                    f"{metadata.reply_to_message_id!r}, delivered_at {metadata.delivered_at!r}, "
                    f"ttl {metadata.ttl})")
        if metadata.src_node_id != SUPERLINK_NODE_ID:
            return f"message {metadata.message_id} has source node {metadata.src_node_id}"
        if metadata.dst_node_id not in self.contexts:
            return f"message {metadata.message_id} is for unknown node {metadata.dst_node_id}"
        return ""

    def _deliver(self, message: Message, exchange: Exchange) -> Message:
        node = message.metadata.dst_node_id
        exchange.message_types.add(message.metadata.message_type)
        inbound = message
        started = self.clock()
        try:
            reply = self.app(inbound, self.contexts[node])
        except Exception as err:  # the runtime reports it as an error reply
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  f"{type(err).__name__}: {err}"), reply_to=inbound)
        exchange.client_seconds[node] = exchange.client_seconds.get(node, 0.0) + \
            self.clock() - started
        if reply.has_error():
            return reply
        content = self._wire(reply.content, node, self.bytes_up, exchange)
        return Message(content=content, metadata=reply.metadata)

    def _wire(self, content: RecordDict, node: int, tally: dict[int, int],
              exchange: Exchange) -> RecordDict:
        if not self.serialize:
            return content
        started = self.clock()
        proto = recorddict_to_proto(content)
        tally[node] = tally.get(node, 0) + proto.ByteSize()
        content = recorddict_from_proto(proto)
        exchange.wire_seconds += self.clock() - started
        return content


def partition_nodes(num_nodes: int) -> dict[int, dict[str, int]]:
    """Node configs of ``num_nodes`` simulated sites, partitions 0..n-1. Ids as a
    SuperLink hands them out: large, and listed in no particular order."""
    return {7_000_000 + 1_009 * k: {"partition-id": k, "num-partitions": num_nodes}
            for k in reversed(range(num_nodes))}


def app_run_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run config Flower would hand the apps: pyproject defaults + overrides."""
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        defaults = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"run config keys {sorted(unknown)} are not declared in "
                         "pyproject.toml (Flower would reject them)")
    return {**defaults, **overrides}


def server_context(run_config: Mapping[str, Any]) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                   run_config=dict(run_config))


def per_node(hooks: Mapping[int, Hook]) -> Hook:
    """One reply hook that applies ``hooks[node]`` to the replies of that node."""
    def hook(reply: Message) -> Message | None:
        node_hook = hooks.get(reply.metadata.src_node_id)
        return reply if node_hook is None else node_hook(reply)
    return hook


def sepal_grid(run_config: Mapping[str, Any], num_nodes: int,
               tamper: Mapping[int, Hook] | None = None,
               keep_messages: bool = False) -> InProcessGrid:
    """Sepal's ClientApp on ``num_nodes`` sites (partitions 0..n-1), replies in reverse
    order; ``tamper`` maps a partition to a hook on its replies (a faulty client)."""
    from client.app import app

    grid = InProcessGrid(app, partition_nodes(num_nodes), run_config, reverse_replies=True,
                         keep_messages=keep_messages)
    if tamper:
        grid.on_reply = per_node({grid.node_of(p): hook for p, hook in tamper.items()})
    return grid


def run_in_process(run_config: Mapping[str, Any], num_nodes: int,
                   tamper: Mapping[int, Hook] | None = None,
                   keep_messages: bool = False) -> tuple[Path, InProcessGrid]:
    """Serve one run (``server.app.serve``) to Sepal's ClientApp on ``num_nodes`` sites;
    returns the run's output folder and the grid."""
    from server.app import serve

    grid = sepal_grid(run_config, num_nodes, tamper, keep_messages)
    return serve(grid, server_context(run_config)), grid
