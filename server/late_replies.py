"""Replies that miss their round's timeout: collected later, logged and discarded.

``Grid.send_and_receive`` stops waiting at ``round-timeout``, but the SuperLink keeps
the instruction until its TTL and stores the reply whenever the SuperNode sends it.
Such a reply belongs to a model that is no longer current, so it must never reach
aggregation; it is pulled in a later round only to say in the log that it came and
was dropped (and to free it on the SuperLink). A node that died shows up the same
way: Flower answers for it with a "Node Unavailable" error once its heartbeats stop.
"""

from __future__ import annotations

import logging

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("sepal.server")


class LateReplies:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.pending: dict[str, tuple[int, int]] = {}  # message id -> (node id, round)

    def remember(self, server_round: int, sent: list[Message], timed_out: list[int],
                 timeout: float) -> None:
        """Note the instructions of ``server_round`` whose node did not reply in time."""
        for message in sent:
            node = message.metadata.dst_node_id
            if node in timed_out and message.metadata.message_id:
                self.pending[message.metadata.message_id] = (node, server_round)
                log.warning("round %d: node %d did not reply within round-timeout %.0fs; the "
                            "round goes on without it", server_round, node, timeout)

    def discard_arrived(self, current_round: int) -> list[tuple[int, int]]:
        """Pull replies that came in after their round closed; log and drop them.

        Returns (node id, round) of each one dropped.
        """
        if not self.pending:
            return []
        dropped = []
        for reply in self.grid.pull_messages(list(self.pending)):
            node, server_round = self.pending.pop(reply.metadata.reply_to_message_id)
            if reply.has_error():
                log.warning("round %d: late answer for node %d to round %d discarded: %s",
                            current_round, node, server_round, reply.error.reason)
            else:
                log.warning("round %d: late reply from node %d to round %d discarded (it came "
                            "after that round's timeout)", current_round, node, server_round)
            dropped.append((node, server_round))
        return dropped
