"""An in-process Grid: the ServerApp's messages go straight to a ClientApp per node.

For protocol tests and benchmarks of multi-stage workflows (secure aggregation):
the server-side code and the ClientApp run unchanged, each node keeps its own
``Context`` (``context.state`` persists across messages, as on a SuperNode), and
every message content crosses Flower's protobuf serialization both ways, so what
a client receives is what would arrive over gRPC. No Ray, no SuperLink: faults
(a node that drops, a tampered or replayed message) are injected with the
``on_instruction`` / ``on_reply`` hooks.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# A hook returns the message to deliver (possibly altered), or None to lose it.
Hook = Callable[[Message], Message | None]


@dataclasses.dataclass
class Exchange:
    """One ``send_and_receive`` call: who computed how long, and the wire's cost."""

    message_types: set[str] = dataclasses.field(default_factory=set)
    client_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    wire_seconds: float = 0.0  # protobuf serialization both ways (not the protocol's work)


class LoopbackGrid(Grid):
    def __init__(self, app: ClientApp, node_ids: Iterable[int], run_config: dict,
                 run_id: int = 1, node_config: Callable[[int], dict] | None = None,
                 serialize: bool = True, clock: Callable[[], float] = time.perf_counter):
        self.app = app
        self.clock = clock  # e.g. time.process_time to time CPU work on a shared machine
        self._run = Run.create_empty(run_id)
        # what a ServerApp process sets before it creates messages
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.serialize = serialize
        self.contexts = {
            node: Context(run_id=run_id, node_id=node,
                          node_config=dict(node_config(node) if node_config else {}),
                          state=RecordDict(), run_config=dict(run_config))
            for node in node_ids
        }
        self.on_instruction: Hook | None = None
        self.on_reply: Hook | None = None
        self.exchanges: list[Exchange] = []
        self.bytes_up: dict[int, int] = {}    # serialized reply contents per node
        self.bytes_down: dict[int, int] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LoopbackGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LoopbackGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies, exchange = [], Exchange()
        self.exchanges.append(exchange)
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if self.on_instruction is not None:
                message = self.on_instruction(message)
                if message is None:
                    continue
            reply = self._deliver(message, exchange)
            if self.on_reply is not None:
                reply = self.on_reply(reply)
                if reply is None:
                    continue
            replies.append(reply)
        return replies

    def _deliver(self, message: Message, exchange: Exchange) -> Message:
        node = message.metadata.dst_node_id
        exchange.message_types.add(message.metadata.message_type)
        content = self._wire(message.content, node, self.bytes_down, exchange)
        inbound = Message(content=content, metadata=message.metadata)
        started = self.clock()
        try:
            reply = self.app(inbound, self.contexts[node])
        except Exception as err:  # a ClientApp exception becomes an error reply, as in Flower
            reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=inbound)
        exchange.client_seconds[node] = self.clock() - started
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
