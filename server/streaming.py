"""Streaming aggregation for strategies that aggregate by a weighted mean.

Torch rather than numpy for the sums: numpy's mixed float32/float64 ufuncs run at about
half the speed of torch's in-place ``add_`` on cache-sized chunks, and these passes are
the server's whole cost per upload.

Each upload is decoded, checked and added into a running sum as it arrives, then
dropped, so the server holds one upload at a time however many sites take part. With
the accepted updates ``u_i`` (local - global) and weights ``w_i`` (``n_i`` =
num-examples, or 1 when the strategy gives every client the same weight, as user-level
DP does), the strategy receives ONE reply, as under secure aggregation:

    arrays       = global + (sum_i w_i u_i) / (sum_i w_i)
    num-examples = sum_i n_i
    metrics      = (sum_i w_i m_i) / (sum_i w_i)  for each metric key every accepted reply carries
    aggregated-clients = the number of accepted updates

FedAvg's weighted mean of that one reply is the reply itself; FedProx, FedAvgM, FedAdam,
FedYogi and FedAdagrad take their server step from it, and Flower's client-side DP
wrappers count it as ``aggregated-clients`` equal replies (``server/central_dp.py``).

Numerics: ``sum_i w_i u_i`` is kept in float64. A float32 value times an integer
weight is exact below 2^29 and within 2^-53 relative above; k such terms sum to within
(k - 1) 2^-53 sum_i |w_i u_i| of the exact sum (1.1e-13 relative for k = 1000), far
below the float32 rounding (2^-24) of the model that is stored. Float64 addition is
commutative but not associative: with two updates the result does not depend on their
order; with more, replies arriving in another order can move the last float64 bit, and
so the stored float32 value by one ulp, for the rare coordinate whose exact mean lies
that close to a float32 rounding boundary. Replies are pulled in node-id order within
each poll, so a grid that answers a round at once is summed deterministically.

Norm check: with a fixed limit (``validation-clip-bound``, or the check off) each update
is judged as it arrives. With the round's median norm as reference the limit is known
only when the round closes, so the ``held_aside`` updates with the largest norms so far
are kept out of the sum (a larger one takes the place of the smallest, which goes into
the sum). At the close all norms are judged as the collect-everything path judges them
(``UpdateValidator.judge_norms``): the same updates are rejected, and the held ones that
pass are summed. If more exceed the limit than were held aside, one is already in the
sum: the round's aggregate is refused (global model kept, every out-of-bounds update
counted as rejected), and the round loop holds that many aside from the next round on
(``server/federation.py``). No out-of-bounds update reaches the model either way.

Memory, whatever the number of sites: the float64 sum (2 x the float32 model), the
upload being read (encoded bytes and decoded values), and under the median rule the
held updates: about (3 + held_aside) x the model plus a constant; ``held_aside`` is 1
unless a round was lost to several out-of-bounds updates.
"""

from __future__ import annotations

import heapq
import warnings
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Message, MetricRecord

from sepal import wire
from server.uploads import (
    CLIENTS_KEY,
    DecodedRound,
    aggregate_reply,
    read_reply,
    reject,
    shared_metric_keys,
)
from server.validation import UpdateValidator, value_summary

CHUNK = 1 << 18  # values per pass step: a float64 chunk (2 MiB) stays in cache


class RunningSum:
    """``sum_i w_i u_i`` over the model's tensors, in one flat float64 vector."""

    def __init__(self, global_arrays: OrderedDict[str, np.ndarray]):
        self.spans: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, array in global_arrays.items():
            self.spans[name] = (offset, offset + array.size)
            offset += array.size
        self.total = torch.zeros(offset, dtype=torch.float64)
        self.weight = 0

    def add(self, update: OrderedDict[str, np.ndarray], weight: int) -> None:
        for name, (start, end) in self.spans.items():
            values, target = _flat(update[name]), self.total[start:end]
            for at in range(0, values.numel(), CHUNK):
                target[at:at + CHUNK].add_(values[at:at + CHUNK], alpha=weight)
        self.weight += weight

    def mean_model(self, global_arrays: OrderedDict[str, np.ndarray]
                   ) -> OrderedDict[str, np.ndarray]:
        """``global + sum / weight`` in the model's dtypes; consumes the sum."""
        self.total.div_(self.weight)
        model = OrderedDict()
        for name, array in global_arrays.items():
            start, end = self.spans[name]
            mean, out = self.total[start:end], np.empty(array.shape, array.dtype)
            out_flat, base = torch.from_numpy(out.reshape(-1)), _flat(array)
            for at in range(0, mean.numel(), CHUNK):
                mean[at:at + CHUNK].add_(base[at:at + CHUNK])
                out_flat[at:at + CHUNK].copy_(mean[at:at + CHUNK])
            model[name] = out
        self.total = torch.zeros(0, dtype=torch.float64)
        return model


def screen(update: OrderedDict[str, np.ndarray], global_arrays: OrderedDict[str, np.ndarray],
           validator: UpdateValidator) -> float:
    """``validator.check`` in one pass over the values; returns the update's L2 norm."""
    validator.check_structure(update, global_arrays)
    within, norm = value_summary(update)
    if not within:
        validator.check(update, global_arrays)  # raises, naming the defect
    return norm


class StreamingRound:
    """One round's uploads, read one at a time into a :class:`RunningSum`."""

    def __init__(self, global_arrays: OrderedDict[str, np.ndarray], validator: UpdateValidator,
                 instruction_nodes: dict[str, int], equal_weights: bool = False,
                 held_aside: int = 1):
        self.global_arrays = global_arrays
        self.validator = validator
        self.instruction_nodes = instruction_nodes
        self.equal_weights = equal_weights
        self.result = DecodedRound([], {}, {}, {})
        self.sum = RunningSum(global_arrays)
        self.norms: dict[int, float] = {}
        self.metrics: dict[int, MetricRecord] = {}  # accepted so far
        self.summed: set[int] = set()
        self.held_aside = held_aside
        self.held: list[tuple[float, int, OrderedDict[str, np.ndarray]]] = []  # min-heap by norm

    def add(self, reply: Message) -> None:
        read = read_reply(reply, self.result, self.global_arrays, self.instruction_nodes,
                          self.validator.cfg.max_site_examples,
                          lambda update: (update, screen(update, self.global_arrays,
                                                         self.validator)))
        if read is None:
            return
        node, (update, norm), metrics = read
        if self.validator.norm_limit_is_fixed:
            defect = self.validator.judge_norms({node: norm}).get(node)
            if defect is not None:
                reject(self.result, node, defect)
                return
            self.metrics[node] = metrics
            self._sum(node, update)
            return
        self.norms[node], self.metrics[node] = norm, metrics
        if len(self.held) < self.held_aside:
            heapq.heappush(self.held, (norm, node, update))
            return
        if norm <= self.held[0][0]:
            self._sum(node, update)
            return
        _, smallest, smallest_update = heapq.heapreplace(self.held, (norm, node, update))
        self._sum(smallest, smallest_update)

    def finish(self, arrays_key: str, instructions: list[Message]) -> DecodedRound:
        """The round's accounting and, if any update was accepted, the one aggregate reply."""
        result = self.result
        out_of_bounds = self.validator.judge_norms(self.norms)
        for node in sorted(out_of_bounds):
            reject(result, node, out_of_bounds[node])
            del self.metrics[node]
        in_sum = sorted(set(out_of_bounds) & self.summed)
        held, self.held = self.held, []
        result.contributors = len(self.metrics)
        result.out_of_bounds = len(out_of_bounds)
        if in_sum:
            result.aggregate_refused = (
                f"{len(out_of_bounds)} updates exceed the norm limit, more than the "
                f"{self.held_aside} the streaming sum holds aside: node(s) {in_sum} are "
                "already in the sum")
            return result
        for _, node, update in sorted(held, key=lambda entry: entry[1]):
            if node not in out_of_bounds:
                self._sum(node, update)
        if self.metrics:
            nodes = sorted(self.metrics)
            shared = shared_metric_keys([self.metrics[n] for n in nodes])
            result.client_metrics = MetricRecord({key: self.metrics[nodes[0]][key]
                                                  for key in self.metrics[nodes[0]]
                                                  if key in shared})
            result.accepted = [aggregate_reply(arrays_key,
                                               self.sum.mean_model(self.global_arrays),
                                               self._mean_metrics(nodes, shared), instructions)]
        return result

    def _weight(self, node: int) -> int:
        return 1 if self.equal_weights else int(self.metrics[node][wire.NUM_EXAMPLES])

    def _sum(self, node: int, update: OrderedDict[str, np.ndarray]) -> None:
        self.sum.add(update, self._weight(node))
        self.summed.add(node)

    def _mean_metrics(self, nodes: list[int], shared: set[str]) -> MetricRecord:
        total = sum(self._weight(n) for n in nodes)
        means = {key: sum(self._weight(n) * float(self.metrics[n][key]) for n in nodes) / total
                 for key in sorted(shared - {wire.NUM_EXAMPLES})}
        return MetricRecord({
            **means,
            wire.NUM_EXAMPLES: sum(int(self.metrics[n][wire.NUM_EXAMPLES]) for n in nodes),
            CLIENTS_KEY: len(nodes),
        })


def _flat(array: np.ndarray) -> torch.Tensor:
    """A flat torch view of ``array`` (no copy; uploads' arrays are read-only views of the
    received bytes, which torch only warns about: nothing here writes to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array).reshape(-1))
