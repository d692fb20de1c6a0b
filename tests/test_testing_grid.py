"""The in-process Grid keeps Flower's push/pull contract; attacks rewrite dense uploads."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from sepal import wire
from sepal.codecs import DenseCodec, build_codec
from testing.attacks import not_a_number, poisoned, scaled
from testing.grid import InProcessGrid

NODES = {11: {"partition-id": 0}, 22: {"partition-id": 1}, 33: {"partition-id": 2}}
UPDATE = OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.ones(2, np.float32))


def _app(codec: str = "dense") -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        if msg.content[wire.CONFIG_KEY].get("fail", False):
            raise RuntimeError("no data on this node")
        seen = int(context.state["seen"]["count"]) + 1 if "seen" in context.state else 1
        context.state["seen"] = ConfigRecord({"count": seen})
        payload, params, _ = build_codec(codec).encode(UPDATE, None)
        return Message(RecordDict({wire.UPDATE_KEY: payload, wire.CODEC_KEY: params,
                                   wire.METRICS_KEY: MetricRecord({"seen": seen})}),
                       reply_to=msg)
    return app


def _instructions(nodes=NODES, **config) -> list[Message]:
    return [Message(RecordDict({wire.CONFIG_KEY: ConfigRecord(config)}), node, MessageType.TRAIN)
            for node in nodes]


def _sources(replies) -> list[int]:
    return [reply.metadata.src_node_id for reply in replies]


def test_each_reply_is_pulled_once_and_only_for_the_ids_asked():
    grid = InProcessGrid(_app(), NODES, {}, keep_messages=True)
    ids = list(grid.push_messages(_instructions()))
    assert len(set(ids)) == 3 and [m.metadata.message_id for m in grid.sent] == ids

    first = list(grid.pull_messages([ids[1]]))
    assert _sources(first) == [22] and first[0].metadata.reply_to_message_id == ids[1]
    assert list(grid.pull_messages([ids[1]])) == []
    assert _sources(grid.pull_messages(ids)) == [11, 33]
    assert list(grid.pull_messages(ids)) == []
    assert grid.replies[0] is first[0] and len(grid.replies) == 3


def test_replies_trickle_in_one_per_pull_and_node_state_persists():
    grid = InProcessGrid(_app(), NODES, {}, replies_per_pull=1, reverse_replies=True)
    for server_round in (1, 2):
        waiting, arrived = list(grid.push_messages(_instructions())), []
        while waiting:
            pulled = list(grid.pull_messages(waiting))
            assert len(pulled) == 1
            arrived += pulled
            waiting.remove(pulled[0].metadata.reply_to_message_id)
        assert _sources(arrived) == [33, 22, 11]
        assert [r.content[wire.METRICS_KEY]["seen"] for r in arrived] == [server_round] * 3
    assert _sources(grid.send_and_receive(_instructions())) == [33, 22, 11]


def test_refused_lost_and_failed_messages():
    grid = InProcessGrid(_app(), NODES, {})
    assert list(grid.push_messages(_instructions(nodes=[99]))) == []  # no such node

    grid.on_instruction = lambda m: None if m.metadata.dst_node_id == 22 else m
    sent = _instructions()
    replies = list(grid.send_and_receive(sent, timeout=1.0))
    assert _sources(replies) == [11, 33]
    assert list(grid.pull_messages([sent[1].metadata.message_id])) == []  # never answered

    grid.on_instruction = None
    failed = list(grid.send_and_receive(_instructions(nodes=[33], fail=True)))
    assert failed[0].has_error()
    assert failed[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "RuntimeError: no data on this node" in failed[0].error.reason


def test_contents_cross_protobuf_and_are_tallied_per_node():
    grid = InProcessGrid(_app(), NODES, {})
    sent = _instructions()
    list(grid.send_and_receive(sent))
    assert set(grid.bytes_up) == set(grid.bytes_down) == set(NODES)
    assert grid.bytes_up[11] > UPDATE["w"].nbytes + UPDATE["b"].nbytes > grid.bytes_down[11]
    exchange = grid.exchanges[-1]
    assert exchange.message_types == {MessageType.TRAIN} and set(exchange.client_seconds) == \
        set(NODES)
    unserialized = InProcessGrid(_app(), NODES, {}, serialize=False)
    list(unserialized.send_and_receive(_instructions()))
    assert unserialized.bytes_up == {}


def test_poisoned_replies_carry_the_attacked_update():
    grid = InProcessGrid(_app(), NODES, {})
    grid.on_reply = poisoned(scaled(-10.0))
    for reply in grid.send_and_receive(_instructions()):
        update = DenseCodec().decode(reply.content[wire.UPDATE_KEY], reply.content[wire.CODEC_KEY],
                                     {k: v.shape for k, v in UPDATE.items()})
        for name in UPDATE:
            np.testing.assert_array_equal(update[name], -10.0 * UPDATE[name])
    grid.on_reply = poisoned(not_a_number)
    update = wire.record_to_arrays(list(grid.send_and_receive(_instructions()))[0]
                                   .content[wire.UPDATE_KEY])
    assert np.isnan(update["w"].flat[0]) and np.isfinite(update["w"].flat[1:]).all()

    quantized = InProcessGrid(_app("q8"), NODES, {})
    quantized.on_reply = poisoned(scaled(2.0))
    with pytest.raises(ValueError, match="rewrite dense uploads; node .* codec 'quantized'"):
        quantized.send_and_receive(_instructions())
