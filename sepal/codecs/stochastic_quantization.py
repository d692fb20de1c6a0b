"""Stochastic uniform quantization: float arrays to integer levels plus scales, and back.

Written here: torch and numpy offer only deterministic rounding (torch.ao quantization is
round-to-nearest, hence biased), and an unbiased update needs stochastic rounding.

A vector is cut into blocks of ``block`` consecutive values (one block when
``block = 0``). Block ``j`` gets a scale ``s_j`` (its largest magnitude, or a fixed
scale the caller chooses) and a grid of ``L = 2**bits - 1`` equal steps over
``[-s_j, s_j]``. A value ``x`` becomes level ``q`` in ``{0, ..., L}`` by rounding
``t = (x / s_j + 1) * L / 2`` down or up at random:

    q = floor(t + u),  u ~ U[0, 1)          x_hat = (2 q / L - 1) * s_j

so ``E[x_hat] = x`` (unbiased) and ``|x_hat - x| < 2 s_j / L`` (less than one step).

This module has no wire format of its own; codecs pack its levels with
:func:`pack_levels`. Secure aggregation can use it alone: with one fixed ``scale``
shared by every client, all clients' levels lie on the same grid, so their integer
sum decodes to the sum of their values (values outside ``[-scale, scale]`` are
clipped first, which is the only biased step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_BITS = 16
DEQUANTIZE_SPAN = 1 << 16  # values dequantized per step (256 KiB of float32, stays in cache)


@dataclasses.dataclass(frozen=True)
class Quantized:
    levels: np.ndarray  # uint8 (bits <= 8) or uint16, one per value, in [0, 2**bits - 1]
    scales: np.ndarray  # float32, one per block
    bits: int
    block: int          # values per block; 0 = one block for the whole vector

    def step(self) -> np.ndarray:
        """Grid step of each block: the largest error of any of its values."""
        return 2.0 * self.scales / ((1 << self.bits) - 1)


def num_blocks(count: int, block: int) -> int:
    if count == 0:
        return 0
    return 1 if block == 0 else -(-count // block)


def block_scales(values: np.ndarray, block: int) -> np.ndarray:
    """Largest magnitude of each block of ``values`` (float32)."""
    values = np.abs(np.asarray(values, dtype=np.float32).ravel())
    if values.size == 0:
        return np.zeros(0, dtype=np.float32)
    if block == 0 or block >= values.size:
        return np.array([values.max()], dtype=np.float32)
    padded = np.zeros(num_blocks(values.size, block) * block, dtype=np.float32)
    padded[: values.size] = values
    return padded.reshape(-1, block).max(axis=1)


def quantize(values: np.ndarray, bits: int, rng: np.random.Generator, block: int = 0,
             scale: float | None = None) -> Quantized:
    """Unbiased stochastic quantization of ``values`` (flattened) to ``bits`` bits.

    ``scale`` fixes every block's scale (values beyond it are clipped); by default each
    block's scale is its largest magnitude, so nothing is clipped.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
    if block < 0:
        raise ValueError(f"block must be >= 0 (0 = one block), got {block}")
    x = np.asarray(values, dtype=np.float32).ravel()
    if scale is None:
        scales = block_scales(x, block)
    else:
        if not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite positive number, got {scale}")
        scales = np.full(num_blocks(x.size, block), scale, dtype=np.float32)
        x = np.clip(x, -scale, scale)
    top = (1 << bits) - 1
    per_value = _per_value(scales, block, x.size)
    safe = np.where(per_value > 0, per_value, np.float32(1.0))
    t = (x / safe + np.float32(1.0)) * np.float32(top / 2)
    t += rng.random(x.size, dtype=np.float32)
    np.floor(t, out=t)
    np.clip(t, 0, top, out=t)
    levels = t.astype(np.uint8 if bits <= 8 else np.uint16)
    return Quantized(levels=levels, scales=scales, bits=bits, block=block)


def dequantize(quantized: Quantized) -> np.ndarray:
    """The float32 values the levels stand for: ``(q * 2 / L - 1) * s``, computed a few
    hundred KiB at a time in the output itself (no whole-vector temporaries)."""
    levels, block, scales = quantized.levels, quantized.block, quantized.scales
    count = levels.size
    out = np.empty(count, np.float32)
    one_scale = block == 0 or block >= count
    span = DEQUANTIZE_SPAN if one_scale else block * max(1, DEQUANTIZE_SPAN // block)
    for start in range(0, count, span):
        part = out[start:start + span]
        np.multiply(levels[start:start + span], np.float32(2.0 / ((1 << quantized.bits) - 1)),
                    out=part)
        part -= np.float32(1.0)
        if one_scale:
            part *= scales[0]
            continue
        whole = part.size - part.size % block
        first = start // block
        part[:whole].reshape(-1, block)[...] *= scales[first:first + whole // block, None]
        if whole < part.size:
            part[whole:] *= scales[first + whole // block]
    return out


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` levels of ``bits`` bits take when packed."""
    return -(-count * bits // 8)


def pack_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Pack levels of 1, 2, 4 or 8 bits densely into bytes, lowest bits first."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"only 1, 2, 4 or 8-bit levels pack into bytes, got {bits}")
    levels = np.asarray(levels, dtype=np.uint8).ravel()
    if bits == 8:
        return levels.copy()
    per_byte = 8 // bits
    padded = np.zeros(packed_size(levels.size, bits) * per_byte, dtype=np.uint8)
    padded[: levels.size] = levels
    padded = padded.reshape(-1, per_byte)
    packed = np.zeros(padded.shape[0], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= padded[:, slot] << np.uint8(bits * slot)
    return packed


def unpack_levels(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_levels`; ``packed`` must hold exactly ``count`` levels."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if packed.size != packed_size(count, bits):
        raise ValueError(f"{packed.size} bytes hold {packed.size * 8 // bits} {bits}-bit "
                         f"levels, expected {count} ({packed_size(count, bits)} bytes)")
    if bits == 8:
        return packed.copy()
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    slots = [(packed >> np.uint8(bits * slot)) & mask for slot in range(per_byte)]
    return np.stack(slots, axis=1).ravel()[:count]


def _per_value(scales: np.ndarray, block: int, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=np.float32)
    if block == 0 or block >= count:
        return np.full(count, scales[0], dtype=np.float32)
    repeats = np.full(scales.size, block, dtype=np.int64)
    repeats[-1] = count - block * (scales.size - 1)  # the last block may be shorter
    return np.repeat(scales.astype(np.float32), repeats)
