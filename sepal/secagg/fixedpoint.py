"""Fixed-point encoding of clipped, weighted updates in Z_(2^b).

A client clips every coordinate of its update to [-c, c] (clipped coordinates are
counted, never hidden), scales it by its weight r in [0, 1] and rounds it
stochastically (unbiased) to an integer multiple of the step c / V, with
V = 2^(q-1) - 1 for q value bits. The integer v in [-V, V] travels as v mod 2^b.

For n clients the true sum lies in [-nV, nV]; with b = bitlength(2nV) we have
2nV + 1 <= 2^b, so the sum mod 2^b identifies it uniquely: no wrap-around, and
the server reads it back as a signed number.

Weights follow Flower's SecAgg+: r = min(examples, W) / W for a configured W
(``secagg-max-examples``), so weighting costs no extra bits; the server divides
the weighted sum by the securely summed weight. The price: a client's rounding
error relative to its contribution grows as 1 / r.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sepal.secagg.masks import word_dtype


@dataclasses.dataclass(frozen=True)
class FixedPoint:
    clip: float        # c
    value_bits: int    # q
    sum_bits: int      # b

    @classmethod
    def for_clients(cls, clip: float, value_bits: int, clients: int) -> FixedPoint:
        return cls(clip, value_bits, sum_bits(value_bits, clients))

    @property
    def levels(self) -> int:
        """V: the largest integer magnitude of one client's encoded value."""
        return 2 ** (self.value_bits - 1) - 1

    @property
    def step(self) -> float:
        return self.clip / self.levels

    @property
    def dtype(self) -> np.dtype:
        return word_dtype(self.sum_bits)

    def encode(self, values: np.ndarray, weight: float,
               rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(v mod 2^b as words, number of coordinates clipped) for ``weight * clip(values)``."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        work = np.float32 if self.value_bits <= 24 else np.float64  # float32: exact below 2^24
        scaled = np.array(values, dtype=work)  # a copy, worked on in place
        clipped = int(np.count_nonzero(np.abs(scaled) > self.clip))
        np.clip(scaled, -self.clip, self.clip, out=scaled)
        scaled *= work(weight / self.step)
        scaled += rng.random(scaled.shape, dtype=work)
        np.floor(scaled, out=scaled)
        np.clip(scaled, -self.levels, self.levels, out=scaled)  # float rounding at the edge
        signed = np.int32 if self.dtype == np.uint32 else np.int64
        return scaled.astype(signed).view(self.dtype), clipped  # two's complement = mod 2^word

    def reduce(self, words: np.ndarray) -> np.ndarray:
        """Words mod 2^b (in place)."""
        if self.sum_bits < 8 * self.dtype.itemsize:
            np.bitwise_and(words, self.dtype.type((1 << self.sum_bits) - 1), out=words)
        return words

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The weighted sum in float64 from the unmasked sum mod 2^b (b <= 62)."""
        total = self.reduce(total.copy())
        signed = total.astype(np.int64)
        signed[total >= (1 << (self.sum_bits - 1))] -= 1 << self.sum_bits
        return signed.astype(np.float64) * self.step


def sum_bits(value_bits: int, clients: int) -> int:
    """b such that the sum of ``clients`` values in [-V, V] never wraps in Z_(2^b)."""
    levels = 2 ** (value_bits - 1) - 1
    return (2 * clients * levels).bit_length()


def weight_of(examples: int, max_examples: int) -> float:
    return min(examples, max_examples) / max_examples



# Per-client scalars summed alongside the update, in Z_(2^64) (exact integers):
# examples, capped examples (the weight's numerator), and loss / accuracy weighted
# by the capped examples in fixed point with 20 fractional bits.
SCALARS = ("examples", "weight-examples", "loss-sum", "accuracy-sum", "clipped")
SCALAR_FRACTION = 2.0**20
MAX_LOSS = 2.0**16


def encode_scalars(examples: int, max_examples: int, loss: float, accuracy: float,
                   clipped: int) -> np.ndarray:
    weighted = min(examples, max_examples)
    loss = min(max(float(loss), 0.0), MAX_LOSS) if math.isfinite(loss) else MAX_LOSS
    accuracy = min(max(float(accuracy), 0.0), 1.0) if math.isfinite(accuracy) else 0.0
    return np.array([examples, weighted, round(loss * weighted * SCALAR_FRACTION),
                     round(accuracy * weighted * SCALAR_FRACTION), clipped], dtype=np.uint64)


def decode_scalars(total: np.ndarray) -> dict[str, float]:
    examples, weighted, loss_sum, accuracy_sum, clipped = (int(v) for v in total)
    return {
        "examples": examples,
        "weight-examples": weighted,
        "train-loss": loss_sum / SCALAR_FRACTION / weighted if weighted else float("nan"),
        "train-accuracy": accuracy_sum / SCALAR_FRACTION / weighted if weighted else float("nan"),
        "clipped": clipped,
    }
