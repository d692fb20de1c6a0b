"""Sparse indices as delta-encoded LEB128 varints.

Written here: protobuf and the varint packages code one integer per Python call; this
codes whole index arrays with numpy.

A tensor's kept positions ``i_0 < i_1 < ...`` travel as ``i_0, i_1 - i_0, i_2 - i_1,
...``: at density ``p`` the gaps average ``1/p``, so one byte (gap < 128) or two
(gap < 16384) per index instead of eight for int64. A repeated index shows up as a
zero gap after the first, which the decoder rejects; a gap can never be negative, so
indices always come back sorted. Encoding and decoding are vectorized with numpy.
"""

from __future__ import annotations

import numpy as np

from sepal.wire import UploadError

MAX_VARINT_BYTES = 5  # 35 bits: any flat index below 2**32
CHUNK_BYTES = 1 << 20  # decoded at a time: bounds the temporaries


def delta_encode(sorted_indices: list[np.ndarray]) -> np.ndarray:
    """The varint byte stream (uint8) of each tensor's sorted indices, one after another."""
    gaps = [np.diff(idx.astype(np.uint64), prepend=np.uint64(0)) for idx in sorted_indices]
    return encode_varints(np.concatenate(gaps) if gaps else np.zeros(0, np.uint64))


def delta_decode(stream: np.ndarray, counts: list[int], sizes: list[int],
                 names: list[str]) -> list[np.ndarray]:
    """Split ``stream`` into each tensor's indices, checking count, range and repeats.

    The counts come from the tensor table (each at most its tensor's size), so the
    stream's length is checked against them before anything is decoded.
    """
    gaps = decode_varints(stream, sum(counts)).view(np.int64)  # < 2**35: same bits
    result = []
    start = 0
    for count, size, name in zip(counts, sizes, names):
        tensor_gaps = gaps[start:start + count]
        start += count
        if count > 1 and not tensor_gaps[1:].all():
            position = int(np.flatnonzero(tensor_gaps[1:] == 0)[0]) + 1
            repeated = int(tensor_gaps[:position + 1].sum())
            raise UploadError(f"tensor '{name}': duplicate index {repeated}")
        indices = np.cumsum(tensor_gaps, out=tensor_gaps)  # in place: no second copy
        if count and indices[-1] >= size:
            raise UploadError(f"tensor '{name}': index {int(indices[-1])} out of range "
                              f"(the tensor has {size} elements)")
        result.append(indices)
    return result


def encode_varints(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.uint64)
    if values.size and int(values.max()) >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"varint value {int(values.max())} needs more than "
                         f"{MAX_VARINT_BYTES} bytes")
    lengths = np.ones(values.size, dtype=np.int64)
    for extra in range(1, MAX_VARINT_BYTES):
        lengths += values >= np.uint64(1 << (7 * extra))
    width = int(lengths.max()) if values.size else 0
    columns = []
    for position in range(width):
        low = (values >> np.uint64(7 * position)) & np.uint64(0x7F)
        more = np.where(position < lengths - 1, 0x80, 0).astype(np.uint64)
        columns.append((low | more).astype(np.uint8))
    if not columns:
        return np.zeros(0, dtype=np.uint8)
    table = np.stack(columns, axis=1)
    return table[np.arange(width)[None, :] < lengths[:, None]]


def decode_varints(stream: np.ndarray, expected: int | None = None) -> np.ndarray:
    """The uint64 values of a varint stream; with ``expected``, exactly that many.

    The stream's length is checked against ``expected`` first (each varint takes 1 to
    ``MAX_VARINT_BYTES`` bytes), then it is decoded in chunks, so memory stays at the
    output plus one chunk whatever the stream holds.
    """
    stream = np.asarray(stream, dtype=np.uint8).ravel()
    if stream.size and stream[-1] & 0x80:
        raise UploadError("indices: the stream ends inside a varint (truncated)")
    if expected is None:
        expected = int(np.count_nonzero(stream < 0x80))
    elif not expected <= stream.size <= MAX_VARINT_BYTES * expected:
        raise UploadError(f"indices: the stream holds {stream.size} bytes, the tensor table "
                          f"declares {expected} indices ({expected} to "
                          f"{MAX_VARINT_BYTES * expected} bytes)")
    values = np.empty(expected, dtype=np.uint64)
    done = start = 0
    while start < stream.size:
        piece = stream[start:start + CHUNK_BYTES]
        ends = np.flatnonzero(piece < 0x80)
        if ends.size == 0:
            raise UploadError(f"indices: a varint is longer than {MAX_VARINT_BYTES} bytes")
        piece = piece[:ends[-1] + 1]  # a varint cut by the chunk's end waits for the next
        decoded = _decode_whole(piece, ends)
        if done + decoded.size > expected:
            raise UploadError(f"indices: the stream holds more than the {expected} indices "
                              "the tensor table declares")
        values[done:done + decoded.size] = decoded
        done += decoded.size
        start += piece.size
    if done != expected:
        raise UploadError(f"indices: the stream holds {done} indices, the tensor table "
                          f"declares {expected}")
    return values


def _decode_whole(piece: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Varints of ``piece``, which ends at the end of one; ``ends``: their last bytes."""
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise UploadError(f"indices: a varint is longer than {MAX_VARINT_BYTES} bytes")
    position = np.arange(piece.size) - np.repeat(starts, lengths)
    parts = (piece & np.uint8(0x7F)).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(parts, starts)
