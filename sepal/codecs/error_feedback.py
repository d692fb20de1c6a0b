"""Error feedback: what a lossy codec did not send is kept and sent later.

With ``x_t`` the round's true update and ``e_t`` the residual kept on the client
(``e_0 = 0``), the client sends ``C(x_t + e_t)`` and keeps

    e_{t+1} = x_t + e_t - D(C(x_t + e_t))

so after T rounds  sum_t D(C(.)) = sum_t x_t - e_T: the running sum of what was sent
tracks the running sum of the true updates up to one residual, which stays bounded
for top-k and quantization (Stich et al., 2018; Karimireddy et al., 2019).

The residual is the codec state: the client keeps it in its node's ``context.state``
(an ArrayRecord, so it survives the fresh ClientApp process each message gets in
deployment). It is on the client side only: uploads look like the inner codec's.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from sepal.codecs.base import Codec
from sepal.wire import arrays_to_record, record_to_arrays


class CodecStateError(ValueError):
    """The stored codec state does not fit the update (another model or codec)."""


class ErrorFeedback(Codec):
    def __init__(self, inner: Codec):
        self.inner = inner
        self.name = inner.name

    def encode_streams(self, update, state):
        shapes = OrderedDict((k, tuple(np.shape(v))) for k, v in update.items())
        residual = self.residual(state, shapes)
        corrected = OrderedDict((k, np.asarray(v, np.float32) + residual[k])
                                for k, v in update.items())
        streams, params, _ = self.inner.encode_streams(corrected, None)
        sent = self.inner.decode_streams(streams, params, shapes)
        new_residual = OrderedDict((k, corrected[k] - sent[k]) for k in shapes)
        return streams, params, arrays_to_record(new_residual)

    def decode_streams(self, streams, params, shapes):
        return self.inner.decode_streams(streams, params, shapes)

    @staticmethod
    def residual(state, shapes) -> OrderedDict[str, np.ndarray]:
        """The stored residual, or zeros in the first round."""
        if state is None:
            return OrderedDict((k, np.zeros(s, np.float32)) for k, s in shapes.items())
        residual = record_to_arrays(state)
        stored = {k: tuple(v.shape) for k, v in residual.items()}
        if stored != dict(shapes):
            raise CodecStateError(
                "the error-feedback residual in this node's state does not match the update "
                f"({len(stored)} tensors stored, {len(shapes)} in the update)")
        return residual
