"""Who shares masks and secrets with whom: the SecAgg+ neighbour graph.

The graph comes from networkx; only the SecAgg+ choice of k and threshold is ours.

Bonawitz et al. (CCS 2017) pair every client with every other: n - 1 masks and
n shares per client. Bell et al. (CCS 2020, SecAgg+) show that a random k-regular
graph with k = O(log n) keeps the same guarantees with high probability, so each
client expands k masks instead of n - 1. Here the graph is complete while that is
no dearer (k >= n - 1) and otherwise a uniformly random k-regular graph (networkx),
with k = 3 * ceil(log2 n) unless configured. A client's neighbourhood is its
neighbours plus itself: the k + 1 holders of its shares.
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction

import networkx as nx

LOG_FACTOR = 3


def neighbour_count(clients: int, requested: int = 0) -> int:
    """k for ``clients`` clients: ``requested`` (0 = 3 ceil(log2 n)), at most n - 1,
    raised by one where n * k would be odd (no k-regular graph exists then)."""
    if clients < 2:
        return 0
    k = requested or LOG_FACTOR * math.ceil(math.log2(clients))
    k = min(k, clients - 1)
    if (clients * k) % 2:
        k += 1
    return min(k, clients - 1)


def as_fraction(value: float) -> Fraction:
    """A configured fraction as the nearest p/q with q <= 100, so that 0.667 means 2/3."""
    return Fraction(value).limit_denominator(100)


def threshold_for(neighbourhood: int, fraction: float) -> int:
    """t: shares needed to reconstruct; at least 2, at most the neighbourhood size."""
    return min(neighbourhood, max(2, math.ceil(as_fraction(fraction) * neighbourhood)))


def build_graph(nodes: list[int], k: int) -> dict[int, list[int]]:
    """Node -> sorted neighbours (itself excluded), k-regular on ``nodes``."""
    nodes = sorted(nodes)
    if k >= len(nodes) - 1:
        return {node: [other for other in nodes if other != node] for node in nodes}
    graph = nx.random_regular_graph(k, len(nodes), seed=secrets.randbits(32))
    return {nodes[i]: sorted(nodes[j] for j in graph.neighbors(i)) for i in range(len(nodes))}
