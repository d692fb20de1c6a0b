"""Model-poisoning clients: reply hooks that rewrite an honest client's upload.

The client trains and encodes as usual; the hook decodes its upload, applies the
attack and encodes the result again before the server pulls the reply, so the
poisoned update skips whatever the client would have done to it (clipping, noise):
a malicious site controls its own process. Install with ``InProcessGrid.on_reply``
or the ``tamper`` of ``testing.grid.run_in_process``:

    run_in_process(run_config, 10, tamper={0: poisoned(scaled(100.0))})

Attacks rewrite dense uploads (``upload-codec = "dense"``); a reply without an upload
(an error, a privacy refusal, an evaluation) passes unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from flwr.app import Message

from sepal import wire
from sepal.codecs import DenseCodec, decode_upload

Update = OrderedDict[str, np.ndarray]
UpdateAttack = Callable[[Update], Update]


def scaled(factor: float) -> UpdateAttack:
    """``factor x update``: a boosted update (model replacement) or, with a negative
    factor, a sign-flipped one that pushes the model away from the honest direction."""
    def attack(update: Update) -> Update:
        return OrderedDict((name, (array * factor).astype(np.float32))
                           for name, array in update.items())
    return attack


def not_a_number(update: Update) -> Update:
    """The update with its first value NaN."""
    poisoned = OrderedDict(update)
    name = next(iter(poisoned))
    poisoned[name] = poisoned[name].copy()
    poisoned[name].flat[0] = np.nan
    return poisoned


def poisoned(attack: UpdateAttack) -> Callable[[Message], Message]:
    """A reply hook that uploads ``attack(update)`` in place of the client's update."""
    def hook(reply: Message) -> Message:
        if reply.has_error() or wire.UPDATE_KEY not in reply.content:
            return reply
        payload, params = reply.content[wire.UPDATE_KEY], reply.content[wire.CODEC_KEY]
        codec = params.get("codec")
        if codec != DenseCodec.name or "lossless" in params:
            raise ValueError(f"attacks rewrite dense uploads; node {reply.metadata.src_node_id}"
                             f" sent codec {codec!r} (run with upload-codec = \"dense\")")
        shapes = {name: tuple(array.shape) for name, array in payload.items()}
        update = decode_upload(payload, params, shapes)
        payload, params, _ = DenseCodec().encode(attack(update), None)
        reply.content[wire.UPDATE_KEY] = payload
        reply.content[wire.CODEC_KEY] = params
        return reply
    return hook
