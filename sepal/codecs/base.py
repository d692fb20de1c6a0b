"""The codec interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

# Per-client state a codec keeps between rounds (e.g. error-feedback residuals);
# the client stores it in its node's context.state so it survives fresh processes.
CodecState = ArrayRecord


class Codec(ABC):
    name: ClassVar[str]

    @abstractmethod
    def encode(
        self, update: OrderedDict[str, np.ndarray], state: CodecState | None
    ) -> tuple[ArrayRecord, ConfigRecord, CodecState | None]:
        """Encode ``update``; return payload, decode parameters and the new state."""

    @abstractmethod
    def decode(
        self, payload: ArrayRecord, params: ConfigRecord, shapes: dict[str, tuple[int, ...]]
    ) -> OrderedDict[str, np.ndarray]:
        """Decode into float32 arrays of ``shapes``; raise UploadError on any defect."""
