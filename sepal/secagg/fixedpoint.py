"""Fixed-point encoding of clipped, weighted updates in Z_(2^b).

Written here: the encoding is part of the SecAgg+ protocol (no library implements it).

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
error relative to its contribution grows as 1 / r. (Under user-level DP every
client uses r = 1.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from sepal.secagg.masks import word_dtype

BLOCK = 1 << 18  # values per block: working set stays in the CPU cache


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

    def encode(self, arrays: np.ndarray | Iterable[np.ndarray], weight: float,
               rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(v mod 2^b as words, coordinates clipped) for ``weight * clip(x)``, x = the
        ``arrays`` flattened one after the other."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        if isinstance(arrays, np.ndarray):
            arrays = [arrays]
        arrays = [np.asarray(array).reshape(-1) for array in arrays]
        words = np.empty(sum(array.size for array in arrays), dtype=self.dtype)
        signed = words.view(np.int32 if self.dtype == np.uint32 else np.int64)
        work = np.float32 if self.value_bits <= 24 else np.float64  # float32: exact below 2^24
        scale = work(weight / self.step)
        buffer, noise = np.empty(BLOCK, dtype=work), np.empty(BLOCK, dtype=work)
        clipped, offset = 0, 0
        for array in arrays:
            for start in range(0, array.size, BLOCK):
                chunk = array[start: start + BLOCK]
                x, u = buffer[: chunk.size], noise[: chunk.size]
                x[:] = chunk
                clipped += int(np.count_nonzero(np.abs(x) > self.clip))
                np.clip(x, -self.clip, self.clip, out=x)
                x *= scale
                x += rng.random(out=u, dtype=work)
                np.floor(x, out=x)
                np.clip(x, -self.levels, self.levels, out=x)  # float rounding at the edge
                signed[offset: offset + chunk.size] = x  # two's complement = v mod 2^word
                offset += chunk.size
        return words, clipped

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """The weighted sum (float32) from the unmasked sum mod 2^b (b <= 62)."""
        result = np.empty(total.size, dtype=np.float32)
        wide = np.int64 if self.sum_bits > 31 else np.int32
        shift = 8 * np.dtype(wide).itemsize - self.sum_bits  # sign-extend from bit b - 1
        for start in range(0, total.size, BLOCK):
            chunk = total[start: start + BLOCK].astype(wide)
            np.left_shift(chunk, shift, out=chunk)
            np.right_shift(chunk, shift, out=chunk)  # arithmetic shift on signed integers
            np.multiply(chunk, self.step, out=result[start: start + BLOCK], casting="unsafe")
        return result


def sum_bits(value_bits: int, clients: int) -> int:
    """b such that the sum of ``clients`` values in [-V, V] never wraps in Z_(2^b)."""
    levels = 2 ** (value_bits - 1) - 1
    return (2 * clients * levels).bit_length()



# Per-client scalars summed alongside the update, in Z_(2^64) (exact integers):
# examples, weight units w (the weight is r = w / W), loss and accuracy weighted by w
# in fixed point with 20 fractional bits, and the clipped count.
SCALARS = ("examples", "weight-units", "loss-sum", "accuracy-sum", "clipped")
SCALAR_FRACTION = 2.0**20
MAX_LOSS = 2.0**16


def encode_scalars(examples: int, weighted: int, loss: float, accuracy: float,
                   clipped: int) -> np.ndarray:
    loss = min(max(float(loss), 0.0), MAX_LOSS) if math.isfinite(loss) else MAX_LOSS
    accuracy = min(max(float(accuracy), 0.0), 1.0) if math.isfinite(accuracy) else 0.0
    return np.array([examples, weighted, round(loss * weighted * SCALAR_FRACTION),
                     round(accuracy * weighted * SCALAR_FRACTION), clipped], dtype=np.uint64)


def decode_scalars(total: np.ndarray) -> dict[str, float]:
    examples, weighted, loss_sum, accuracy_sum, clipped = (int(v) for v in total)
    return {
        "examples": examples,
        "weight-units": weighted,
        "train-loss": loss_sum / SCALAR_FRACTION / weighted if weighted else float("nan"),
        "train-accuracy": accuracy_sum / SCALAR_FRACTION / weighted if weighted else float("nan"),
        "clipped": clipped,
    }
