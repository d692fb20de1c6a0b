"""Pack integers of b bits into ceil(n / 8) * b bytes, and back.

Written here: numpy packs only single bits (``np.packbits``) and no maintained library
packs arbitrary b-bit integers vectorized.

Layout: the vector, zero-padded to 8m values, is cut into eight contiguous lanes
of m values; value j of each lane forms group j, whose 8 values (lane 0 in the
lowest bits) make 8b bits = b bytes; byte i of every group is stored contiguously
(byte plane i). Every step is then a contiguous numpy operation, about (b + 8)
shifts per 8 values and no per-bit loops, done on column blocks of ``BLOCK``
groups so that the working set stays in the CPU cache.
"""

from __future__ import annotations

import numpy as np

from sepal.secagg.masks import word_dtype

LANES = 8
BLOCK = 1 << 15  # groups per block: 8 lanes x 32768 x 4 bytes = 1 MiB of words


def packed_size(count: int, bits: int) -> int:
    return -(-count // LANES) * bits


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (unsigned, < 2^bits) as a uint8 array of ``packed_size`` bytes."""
    dtype = word_dtype(bits).newbyteorder("<")
    count = len(values)
    length = -(-count // LANES)
    planes = np.zeros((bits, length), dtype=np.uint8)
    lanes = np.empty((LANES, min(BLOCK, length)), dtype=dtype)
    scratch = np.empty(lanes.shape[1], dtype=dtype)
    low_bytes = scratch.view(np.uint8)[:: dtype.itemsize]  # the lowest byte of each word
    for start in range(0, length, BLOCK):
        width = min(BLOCK, length - start)
        for lane in range(LANES):
            first, last = lane * length + start, min(lane * length + start + width, count)
            lanes[lane, : max(last - first, 0)] = values[first:last]
            lanes[lane, max(last - first, 0): width] = 0
        for plane, lane, shift in _overlaps(bits):
            if shift >= 0:
                np.right_shift(lanes[lane, :width], dtype.type(shift), out=scratch[:width])
            else:
                np.left_shift(lanes[lane, :width], dtype.type(-shift), out=scratch[:width])
            target = planes[plane, start: start + width]
            np.bitwise_or(target, low_bytes[:width], out=target)
    return planes.reshape(-1)


def add_packed(total: np.ndarray, packed: np.ndarray, bits: int) -> np.ndarray:
    """``total += unpack(packed)`` in wrapping words, without unpacking the whole vector."""
    dtype = total.dtype
    count = total.size
    length = -(-count // LANES)
    if packed.dtype != np.uint8 or packed.size != bits * length:
        raise ValueError(f"packed vector must be {bits * length} bytes (uint8), "
                         f"got {packed.size} ({packed.dtype})")
    planes = packed.reshape(bits, length)
    lanes = np.empty((LANES, min(BLOCK, length)), dtype=dtype)
    scratch = np.empty(lanes.shape[1], dtype=dtype)
    low_bits = dtype.type((1 << bits) - 1) if bits < 8 * dtype.itemsize else None
    for start in range(0, length, BLOCK):
        width = min(BLOCK, length - start)
        block = lanes[:, :width]
        block[:] = 0
        for plane, lane, shift in _overlaps(bits):
            scratch[:width] = planes[plane, start: start + width]
            if shift >= 0:
                np.left_shift(scratch[:width], dtype.type(shift), out=scratch[:width])
            else:
                np.right_shift(scratch[:width], dtype.type(-shift), out=scratch[:width])
            np.bitwise_or(block[lane], scratch[:width], out=block[lane])
        if low_bits is not None:
            np.bitwise_and(block, low_bits, out=block)
        for lane in range(LANES):
            first, last = lane * length + start, min(lane * length + start + width, count)
            if first < last:
                np.add(total[first:last], block[lane, : last - first], out=total[first:last])
    return total


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` values of ``bits`` bits that :func:`pack` stored in ``packed``."""
    return add_packed(np.zeros(count, dtype=word_dtype(bits)), packed, bits)


def _overlaps(bits: int):
    """(byte plane, lane, shift): plane's bits [8p, 8p+8) meet lane's bits [lb, lb+b)."""
    for lane in range(LANES):
        start = lane * bits
        for plane in range(start // 8, (start + bits - 1) // 8 + 1):
            yield plane, lane, 8 * plane - start
