"""Compressed downlink: clients rebuild the server's reference bit for bit, nodes that
sat out rounds catch up through a chain of deltas, and mismatches fail loudly."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict

from sepal import wire
from sepal.codecs import build_codec
from sepal.codecs.downlink import DownlinkBroadcaster, DownloadError, receive_global

SHAPES = OrderedDict([("embeddings.weight", (300, 16)), ("layer.weight", (16, 16)),
                      ("classifier.weight", (2, 16))])


def instructions(weights, nodes):
    """Train instructions as FedAvg builds them: one RecordDict shared by all messages."""
    shared = RecordDict({wire.ARRAYS_KEY: wire.arrays_to_record(weights),
                         wire.CONFIG_KEY: ConfigRecord({"server-round": 1})})
    return [Message(content=shared, metadata=Metadata(
        run_id=1, message_id="", src_node_id=0, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN))
        for node in nodes]


def trajectory(rounds: int):
    rng = np.random.default_rng(0)
    weights = OrderedDict((k, rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items())
    for _ in range(rounds):
        yield weights
        weights = OrderedDict((k, (v + 1e-2 * rng.normal(size=v.shape)).astype(np.float32))
                              for k, v in weights.items())


def test_clients_track_the_reference_and_skipped_rounds_catch_up_by_deltas():
    server = DownlinkBroadcaster(build_codec("topk:0.1,q8", np.random.default_rng(1)))
    states = {node: RecordDict() for node in (1, 2, 3)}
    sampled = {1: [1, 2, 3], 2: [1, 2], 3: [1, 2], 4: [1, 2, 3], 5: [1, 2, 3]}
    sizes = {}
    for server_round, weights in enumerate(trajectory(5), start=1):
        server.advance(weights, server_round)
        messages = server.address(instructions(weights, sampled[server_round]))
        for message in messages:
            node = message.metadata.dst_node_id
            sizes[server_round, node] = wire.serialized_size(message.content)
            held = receive_global(message.content, states[node])
            assert all(np.array_equal(held[k], server.reference[k]) for k in SHAPES)
            assert message.content[wire.CONFIG_KEY]["server-round"] == 1  # the rest is kept
        server.settle([m.metadata.dst_node_id for m in messages], failed=set())
        gap = max(np.abs(weights[k] - server.reference[k]).max() for k in SHAPES)
        assert gap < 0.1  # what a delta leaves out goes out with the next one

    full = sizes[1, 1]
    assert sizes[2, 1] < full / 10  # one delta
    assert sizes[4, 1] < full / 10
    # node 3 sat out rounds 2 and 3: round 4 brings it three deltas in one message
    assert sizes[4, 3] > 2.5 * sizes[4, 1] and sizes[4, 3] < full / 3
    assert [d.version for d in server.chain_from(1)] == [2, 3, 4, 5]
    assert server.chain_from(None) is None


def _round(server, weights, server_round, nodes, states, failed=()):
    server.advance(weights, server_round)
    messages = server.address(instructions(weights, nodes))
    for message in messages:
        if message.metadata.dst_node_id not in failed:
            receive_global(message.content, states[message.metadata.dst_node_id])
    server.settle(nodes, failed=set(failed))
    return {m.metadata.dst_node_id: m.content for m in messages}


def test_nodes_the_server_cannot_vouch_for_get_the_full_reference():
    server = DownlinkBroadcaster(build_codec("q8", np.random.default_rng(2)))
    states = {node: RecordDict() for node in (1, 2, 3)}
    steps = trajectory(6)
    _round(server, next(steps), 1, [1, 2, 3], states, failed=[2])
    sent = _round(server, next(steps), 2, [1, 2], states)
    assert sent[1]["download"]["base"] == 1
    assert sent[2]["download"]["base"] == -1 and wire.ARRAYS_KEY in sent[2]  # it failed round 1
    for server_round in (3, 4, 5, 6):
        sent = _round(server, next(steps), server_round, [1, 3] if server_round == 6 else [1],
                      states)
    # 8-bit deltas are a quarter of the model: the server keeps only as many as are
    # worth sending, so node 3, five versions behind, gets the whole reference again
    assert len(server.deltas) < 5
    assert sent[3]["download"]["base"] == -1
    assert sent[1]["download"]["deltas"] == 1


def test_a_client_that_does_not_hold_the_base_version_refuses_loudly():
    server = DownlinkBroadcaster(build_codec("q8", np.random.default_rng(3)))
    steps = trajectory(3)
    states = {1: RecordDict()}
    _round(server, next(steps), 1, [1], states)
    stale = RecordDict({k: v for k, v in states[1].items()})
    _round(server, next(steps), 2, [1], states)
    server.advance(next(steps), 3)
    message = server.address(instructions(server.reference, [1]))[0]
    with pytest.raises(DownloadError, match="deltas from version 2 .* this node holds version 1"):
        receive_global(message.content, stale)
    other_run = DownlinkBroadcaster(server.codec)
    other_run.lineage, other_run.reference, other_run.version = "0ther", server.reference, 2
    other_run.held[1] = 2
    other_run.advance(server.reference, 3)
    message = other_run.address(instructions(server.reference, [1]))[0]
    with pytest.raises(DownloadError, match="lineage 0ther"):
        receive_global(message.content, states[1])


def test_a_dense_instruction_is_read_as_is_and_leaves_no_state():
    weights = next(trajectory(1))
    state = RecordDict()
    message = instructions(weights, [1])[0]
    held = receive_global(message.content, state)
    assert all(np.array_equal(held[k], weights[k]) for k in SHAPES)
    assert len(state) == 0
