"""Pack integers of b bits into ceil(n / 8) * b bytes, and back.

Layout: the vector, zero-padded to 8m values, is cut into eight contiguous lanes
of m values; value j of each lane forms group j, whose 8 values (lane 0 in the
lowest bits) make 8b bits = b bytes; byte i of every group is stored contiguously
(byte plane i). Working on whole lanes and planes keeps every step a contiguous
numpy operation: about (b + 8) shifts per 8 values, no per-bit loops.
"""

from __future__ import annotations

import numpy as np

from sepal.secagg.masks import word_dtype

LANES = 8


def packed_size(count: int, bits: int) -> int:
    return -(-count // LANES) * bits


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (unsigned, < 2^bits) as a uint8 array of ``packed_size`` bytes."""
    dtype = word_dtype(bits)
    lane_length = -(-len(values) // LANES)
    lanes = np.zeros(LANES * lane_length, dtype=dtype)
    lanes[: len(values)] = values
    lanes = lanes.reshape(LANES, lane_length)
    planes = np.zeros((bits, lane_length), dtype=np.uint8)
    scratch = np.empty(lane_length, dtype=dtype.newbyteorder("<"))
    low_bytes = scratch.view(np.uint8)[:: dtype.itemsize]  # the lowest byte of each word
    for plane, lane, shift in _overlaps(bits):
        if shift >= 0:
            np.right_shift(lanes[lane], dtype.type(shift), out=scratch)
        else:
            np.left_shift(lanes[lane], dtype.type(-shift), out=scratch)
        np.bitwise_or(planes[plane], low_bytes, out=planes[plane])
    return planes.reshape(-1)


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` values of ``bits`` bits that :func:`pack` stored in ``packed``."""
    dtype = word_dtype(bits)
    lane_length = -(-count // LANES)
    if packed.dtype != np.uint8 or packed.size != bits * lane_length:
        raise ValueError(f"packed vector must be {bits * lane_length} bytes (uint8), "
                         f"got {packed.size} ({packed.dtype})")
    planes = packed.reshape(bits, lane_length)
    lanes = np.zeros((LANES, lane_length), dtype=dtype)
    scratch = np.empty(lane_length, dtype=dtype)
    for plane, lane, shift in _overlaps(bits):
        scratch[:] = planes[plane]
        if shift >= 0:
            np.left_shift(scratch, dtype.type(shift), out=scratch)
        else:
            np.right_shift(scratch, dtype.type(-shift), out=scratch)
        np.bitwise_or(lanes[lane], scratch, out=lanes[lane])
    values = lanes.reshape(-1)[:count]
    if bits < 8 * dtype.itemsize:
        np.bitwise_and(values, dtype.type((1 << bits) - 1), out=values)
    return values


def _overlaps(bits: int):
    """(byte plane, lane, shift): plane's bits [8p, 8p+8) meet lane's bits [lb, lb+b)."""
    for lane in range(LANES):
        start = lane * bits
        for plane in range(start // 8, (start + bits - 1) // 8 + 1):
            yield plane, lane, 8 * plane - start
