"""The tensor table of a compressed upload: which tensors it carries, with what shape.

Params ``tensors`` (names), ``ranks`` and ``dims`` (shapes, flattened) and, for
sparse codecs, ``counts`` (values kept per tensor). Reading the table checks every
entry against the receiver's model, so a tensor the model does not have, a shape
that differs or a count larger than the tensor is rejected before any data is read.
"""

from __future__ import annotations

import dataclasses
import math

from sepal.codecs.base import Params, Shapes, int_list
from sepal.wire import UploadError


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    count: int  # values carried: the kept ones (sparse) or all of them (dense)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def model_size(shapes: Shapes) -> int:
    """Elements in the whole model: the bound on every size an upload declares."""
    return sum(math.prod(shape) for shape in shapes.values())


def write_table(entries: list[TensorEntry], with_counts: bool) -> Params:
    params: Params = {
        "tensors": [e.name for e in entries],
        "ranks": [len(e.shape) for e in entries],
        "dims": [d for e in entries for d in e.shape],
    }
    if with_counts:
        params["counts"] = [e.count for e in entries]
    return params


def read_table(params: Params, shapes: Shapes, with_counts: bool) -> list[TensorEntry]:
    names = params.get("tensors")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UploadError("codec parameter 'tensors' must be a list of tensor names")
    ranks = int_list(params, "ranks")
    dims = int_list(params, "dims")
    counts = int_list(params, "counts") if with_counts else None
    if len(ranks) != len(names) or (counts is not None and len(counts) != len(names)):
        raise UploadError(f"tensor table: {len(names)} names but {len(ranks)} ranks"
                          + (f" and {len(counts)} counts" if counts is not None else ""))
    if any(r < 0 for r in ranks) or sum(ranks) != len(dims):
        raise UploadError(f"tensor table: ranks {ranks[:5]}... do not match {len(dims)} dims")
    entries: list[TensorEntry] = []
    seen: set[str] = set()
    offset = 0
    for position, name in enumerate(names):
        shape = tuple(dims[offset:offset + ranks[position]])
        offset += ranks[position]
        if name not in shapes:
            raise UploadError(f"tensor '{name}' is not in the model")
        if name in seen:
            raise UploadError(f"tensor '{name}' appears twice in the upload")
        seen.add(name)
        if shape != tuple(shapes[name]):
            raise UploadError(f"tensor '{name}' has shape {shape}, the model's is "
                              f"{tuple(shapes[name])}")
        size = math.prod(shape)
        count = counts[position] if counts is not None else size
        if not 0 <= count <= size:
            raise UploadError(f"tensor '{name}' declares {count} values but has {size} "
                              "elements")
        entries.append(TensorEntry(name, shape, count))
    return entries
