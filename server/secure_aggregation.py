"""Server side of SecAgg+: learn the sum of the round's updates and nothing else.

Each sampled client i holds an update x_i (flattened, local - global) and a count
of examples n_i. With weight r_i = w_i / W (w_i = min(n_i, W), or W for every
client under user-level DP), clip c and the fixed point of
``sepal.secagg.fixedpoint``, client i uploads only

    y_i = Q(r_i * clip(x_i)) + PRG(s_i) + sum_{j in N(i)} sign(i, j) * PRG(k_ij)  (mod 2^b)

where s_i is i's self-mask seed and k_ij the X25519/HKDF key it shares with its
neighbour j (the lower id adds, the higher subtracts, so pairwise masks cancel).
For the set S of clients whose masked input arrived, the server collects Shamir
shares to rebuild s_i for i in S and the mask key of every neighbour that dropped
after sharing keys, and obtains

    sum_{i in S} Q(r_i * clip(x_i))   and   sum_{i in S} w_i

from which the strategy gets ONE reply, shaped as Flower's strategies expect:

    arrays = global + (sum_i r_i x_i) / (sum_i r_i),   num-examples = sum_i n_i

so FedAvg, FedAvgM, FedProx, FedAdam, FedYogi (and any wrapper that acts on the
aggregate, such as central-DP noise, which counts the reply as its ``secagg-clients``
contributors) aggregate the unmasked mean unchanged. Strategies that need the
individual updates (median, trimmed mean, Krum, MultiKrum, Bulyan, q-FedAvg,
server-side DP clipping) and adaptive user-level DP are refused at start-up.

Clients that fail, time out or send a malformed, replayed or unauthenticated
message are dropped and logged; if fewer than t clients remain at any stage, or a
secret lacks t shares, the round is abandoned without unmasking anything and the
global model is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from sepal import wire
from sepal.codecs import parse_chain
from sepal.config import ConfigError
from sepal.privacy import UserLevelDPSettings
from sepal.privacy.refusal import Refusal, read_reply_privacy
from sepal.secagg import graph, shamir
from sepal.secagg.config import SecAggConfig
from sepal.secagg.errors import RoundAborted, SecAggError
from sepal.secagg.fixedpoint import SCALARS, FixedPoint, decode_scalars
from sepal.secagg.keys import agree, check_public_key, derive, public_key_of
from sepal.secagg.masks import VectorMasks
from sepal.secagg.packing import add_packed, packed_size
from sepal.secagg.protocol import (
    HEADER_KEY,
    KEYS_KEY,
    MASKED_INPUT,
    MASKED_KEY,
    PAIR_MASK,
    PARAMS_KEY,
    REPORT_KEY,
    SELF_MASK,
    SETUP,
    SHARE_KEYS,
    SHARES_KEY,
    UNMASK,
    UNMASK_KEY,
    RoundTag,
    config_field,
    message_type,
    pair_sign,
    seed_commitment,
)
from server.federation import Federation
from server.uploads import DecodedRound

log = logging.getLogger("sepal.server")

# Strategies whose aggregation reads individual updates: they cannot run on a secure sum.
NEEDS_INDIVIDUAL_UPDATES = (FedMedian, FedTrimmedAvg, MultiKrum, Bulyan, QFedAvg,
                            DifferentialPrivacyServerSideFixedClipping,
                            DifferentialPrivacyServerSideAdaptiveClipping)


def check_strategy(strategy: Strategy) -> None:
    """Refuse a strategy that cannot aggregate one pre-summed reply.

    A strategy (or a plug-in) may declare ``secure_aggregation_compatible``; otherwise
    wrappers are unwrapped through ``.strategy`` / ``.wrapped`` and the innermost must be
    FedAvg-shaped (a weighted mean of ``arrays``) and not one of ``NEEDS_INDIVIDUAL_UPDATES``.
    """
    current: Any = strategy
    while True:
        declared = getattr(current, "secure_aggregation_compatible", None)
        if declared is not None:
            ok = bool(declared)
            break
        if isinstance(current, NEEDS_INDIVIDUAL_UPDATES):
            ok = False
            break
        inner = getattr(current, "strategy", None) or getattr(current, "wrapped", None)
        if isinstance(inner, Strategy):
            current = inner
            continue
        ok = isinstance(current, FedAvg)
        break
    if not ok:
        raise ConfigError(
            f"run config 'secure-aggregation' = true cannot be used with strategy "
            f"{type(current).__name__}: it needs the individual client updates, and secure "
            "aggregation reveals only their sum. Use a FedAvg-style strategy (FedAvg, FedAvgM, "
            "FedProx, FedAdam, FedYogi) or turn secure aggregation off")


def check_codec(spec: str) -> None:
    """Refuse codecs whose upload is sparse per client: masking would densify it."""
    if parse_chain(spec).topk > 0:
        raise ConfigError(
            f"run config 'upload-codec' = {spec!r} cannot be combined with "
            "'secure-aggregation': each client picks its own coordinates, and a masked "
            "vector must cover every coordinate, so top-k would lose all its savings. Use a "
            "dense or quantizing codec")


def check_user_dp(settings: UserLevelDPSettings) -> None:
    """Adaptive clipping needs each client's clipped bit, which a secure sum hides."""
    if settings.enabled and settings.adaptive:
        raise ConfigError(
            f"run config 'user-dp' = {settings.user_dp!r} cannot be combined with "
            "'secure-aggregation': adaptive clipping counts the clients whose update was "
            "clipped from each reply, and secure aggregation sends one summed reply. Use "
            "'client-fixed' (its noise goes on the unmasked mean)")


@dataclasses.dataclass
class SecureRound:
    """Outcome of one secure aggregation: the unmasked aggregate or why there is none."""

    mean_update: np.ndarray | None = None
    totals: dict[str, float] = dataclasses.field(default_factory=dict)
    contributors: list[int] = dataclasses.field(default_factory=list)
    aborted: str | None = None
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    rejected: dict[int, str] = dataclasses.field(default_factory=dict)
    timed_out: dict[int, str] = dataclasses.field(default_factory=dict)  # node -> stage
    refused: dict[int, Refusal] = dataclasses.field(default_factory=dict)  # privacy budget
    privacy: dict[int, ConfigRecord] = dataclasses.field(default_factory=dict)  # ε reports
    bytes_up: dict[int, int] = dataclasses.field(default_factory=dict)
    bytes_down: dict[int, int] = dataclasses.field(default_factory=dict)
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    sum_bits: int = 0
    threshold: int = 0
    neighbours: int = 0


@dataclasses.dataclass
class _RoundState:
    tag: RoundTag
    fixed: FixedPoint
    dim: int
    k: int
    threshold: int
    active: list[int]
    neighbours: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    keys: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)
    commitments: dict[int, bytes] = dataclasses.field(default_factory=dict)
    forwarded: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    values: np.ndarray | None = None
    scalars: np.ndarray | None = None
    dropped: list[int] = dataclasses.field(default_factory=list)


class SecureAggregation:
    """Drives one SecAgg+ round through the Grid (four ``train.secagg_*`` stages)."""

    def __init__(self, grid: Grid, config: SecAggConfig, train_timeout: float,
                 min_clients: int = 2, count_bytes: bool = True):
        self.grid = grid
        self.config = config
        self.train_timeout = train_timeout
        self.min_clients = max(2, min_clients)
        self.count_bytes = count_bytes  # serialized size of every message (costs a serialization)

    def run(self, messages: list[Message], dim: int) -> SecureRound:
        """Run the round for the strategy's train ``messages`` over ``dim`` values."""
        result = SecureRound()
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        server_round = int(messages[0].content[wire.CONFIG_KEY]["server-round"]) if messages else 0
        k = graph.neighbour_count(len(nodes), self.config.secagg_neighbours)
        state = _RoundState(
            tag=RoundTag.new(self.grid.run.run_id, server_round),
            fixed=FixedPoint.for_clients(self.config.secagg_clip, self.config.secagg_value_bits,
                                         max(len(nodes), 2)),
            dim=dim, k=k, threshold=graph.threshold_for(k + 1, self.config.secagg_threshold),
            active=nodes)
        result.sum_bits, result.threshold = state.fixed.sum_bits, state.threshold
        try:
            self._require(state, len(nodes), "sampled")
            for stage, step in ((SETUP, lambda: self.setup(state, result)),
                                (SHARE_KEYS, lambda: self.share_keys(state, result)),
                                (MASKED_INPUT, lambda: self.masked_input(state, messages,
                                                                         result)),
                                (UNMASK, lambda: self.unmask(state, result))):
                started = time.perf_counter()
                step()
                result.stage_seconds[stage] = round(time.perf_counter() - started, 3)
        except RoundAborted as err:
            result.aborted = str(err)
            log.warning("round %d: secure aggregation abandoned, nothing unmasked, global "
                        "model kept: %s", server_round, err)
        result.neighbours = state.k
        return result

    # -- stages ------------------------------------------------------------------------

    def setup(self, state: _RoundState, result: SecureRound) -> None:
        """Send the round's parameters; collect two public keys per client."""
        params = ConfigRecord({"clients": len(state.active), "sum-bits": state.fixed.sum_bits})
        content = RecordDict({HEADER_KEY: state.tag.header(SETUP), PARAMS_KEY: params})
        outgoing = [self._message(state, node, SETUP, content) for node in state.active]
        seen_keys: set[bytes] = set()

        def read(node: int, reply: Message) -> None:
            envelope_key = config_field(reply.content, KEYS_KEY, "envelope-key", bytes)
            mask_key = config_field(reply.content, KEYS_KEY, "mask-key", bytes)
            check_public_key(envelope_key, f"node {node}")
            check_public_key(mask_key, f"node {node}")
            if {envelope_key, mask_key} & seen_keys or envelope_key == mask_key:
                raise SecAggError("public key already presented in this round")
            seen_keys.update((envelope_key, mask_key))
            state.keys[node] = (envelope_key, mask_key)

        self._exchange(state, SETUP, outgoing, self.config.secagg_stage_timeout, result, read)
        state.active = sorted(state.keys)
        self._require(state, len(state.active), "setup")
        state.k = graph.neighbour_count(len(state.active), state.k)
        state.neighbours = graph.build_graph(state.active, state.k)

    def share_keys(self, state: _RoundState, result: SecureRound) -> None:
        """Send each client its neighbours' keys; collect the envelopes of its shares."""
        outgoing = []
        for node in state.active:
            hood = self._neighbourhood(state, node)
            keys = ConfigRecord({
                "nodes": hood, "threshold": state.threshold,
                "envelope-keys": [state.keys[n][0] for n in hood],
                "mask-keys": [state.keys[n][1] for n in hood],
            })
            content = RecordDict({HEADER_KEY: state.tag.header(SHARE_KEYS), KEYS_KEY: keys})
            outgoing.append(self._message(state, node, SHARE_KEYS, content))
        inbox: dict[int, list[tuple[int, bytes]]] = {node: [] for node in state.active}

        def read(node: int, reply: Message) -> None:
            recipients = config_field(reply.content, SHARES_KEY, "recipients", list, int)
            envelopes = config_field(reply.content, SHARES_KEY, "envelopes", list, bytes)
            commitment = config_field(reply.content, SHARES_KEY, "seed-commitment", bytes)
            if sorted(recipients) != state.neighbours[node] or len(envelopes) != len(recipients):
                raise SecAggError("envelopes are not addressed one to each neighbour")
            state.commitments[node] = commitment
            for recipient, sealed in zip(recipients, envelopes):
                inbox[recipient].append((node, sealed))

        state.active = self._exchange(state, SHARE_KEYS, outgoing,
                                      self.config.secagg_stage_timeout, result, read)
        self._require(state, len(state.active), "share-keys")
        active = set(state.active)
        state.forwarded = {node: [(s, e) for s, e in inbox[node] if s in active]
                           for node in state.active}
        for node in state.active:
            if len(state.forwarded[node]) + 1 < state.threshold:
                raise RoundAborted(f"node {node} has {len(state.forwarded[node]) + 1} of its "
                                   f"neighbourhood left after share-keys < threshold "
                                   f"{state.threshold}")

    def masked_input(self, state: _RoundState, messages: list[Message],
                     result: SecureRound) -> None:
        """Forward the envelopes with the model; collect and sum the masked inputs."""
        train_content = {m.metadata.dst_node_id: m.content for m in messages}
        outgoing = []
        for node in state.active:
            pairs = state.forwarded[node]
            shares = ConfigRecord({"senders": [s for s, _ in pairs],
                                   "envelopes": [e for _, e in pairs]})
            content = RecordDict({**train_content[node], HEADER_KEY: state.tag.header(MASKED_INPUT),
                                  SHARES_KEY: shares})
            outgoing.append(self._message(state, node, MASKED_INPUT, content))
        state.forwarded = {node: [s for s, _ in pairs] for node, pairs in state.forwarded.items()}
        expected_bytes = packed_size(state.dim, state.fixed.sum_bits)
        inputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        accused: dict[int, int] = {}

        def read(node: int, reply: Message) -> None:
            try:
                report, refusal = read_reply_privacy(reply.content)
            except wire.UploadError as err:
                raise SecAggError(str(err)) from err
            if report is not None:
                result.privacy[node] = report
            if refusal is not None:  # trains no more (privacy budget): counts as dropped
                result.refused[node] = refusal
                return
            masked = reply.content.get(MASKED_KEY)
            if not isinstance(masked, ArrayRecord) or set(masked.keys()) != {"values", "scalars"}:
                raise SecAggError(f"'{MASKED_KEY}' must be an ArrayRecord of values and scalars")
            try:
                values = wire.read_array(masked["values"], "masked vector")
                scalars = wire.read_array(masked["scalars"], "masked scalars")
            except wire.UploadError as err:
                raise SecAggError(str(err)) from err
            if values.dtype != np.uint8 or values.shape != (expected_bytes,):
                raise SecAggError(f"masked vector has {values.size} {values.dtype} values, "
                                  f"expected {expected_bytes} uint8 ({state.dim} values at "
                                  f"{state.fixed.sum_bits} bits)")
            if scalars.dtype != np.uint64 or scalars.shape != (len(SCALARS),):
                raise SecAggError(f"masked scalars must be {len(SCALARS)} uint64")
            bad = config_field(reply.content, REPORT_KEY, "bad-senders", list, int)
            inputs[node] = (values, scalars)
            for sender in bad:
                if sender in state.forwarded[node]:
                    accused.setdefault(sender, node)

        self._exchange(state, MASKED_INPUT, outgoing, self.train_timeout, result, read)
        for sender, accuser in accused.items():
            reason = (f"node {accuser} could not open its share envelope (failed authentication: "
                      "tampered, replayed or malformed)")
            result.rejected[sender] = reason
            log.warning("round %d: node %d dropped: %s", state.tag.server_round, sender, reason)
            inputs.pop(sender, None)
        survivors = sorted(inputs)
        self._require(state, len(survivors), "masked-input")
        state.dropped = [node for node in state.active if node not in inputs]
        for node in survivors + state.dropped:
            holders = set(self._neighbourhood(state, node)) & set(survivors)
            if len(holders) < state.threshold and (node in inputs or holders):
                raise RoundAborted(f"only {len(holders)} survivor(s) hold shares of node {node} "
                                   f"< threshold {state.threshold}")
        state.values = np.zeros(state.dim, dtype=state.fixed.dtype)
        state.scalars = np.zeros(len(SCALARS), dtype=np.uint64)
        for node in survivors:
            values, scalars = inputs.pop(node)
            add_packed(state.values, values, state.fixed.sum_bits)
            np.add(state.scalars, scalars, out=state.scalars)
        state.active = survivors

    def unmask(self, state: _RoundState, result: SecureRound) -> None:
        """Collect shares; remove the survivors' self masks and the dropped' pairwise masks."""
        survivors, dropped = set(state.active), set(state.dropped)
        outgoing = []
        for node in state.active:
            hood = self._neighbourhood(state, node)
            lists = ConfigRecord({"survivors": [n for n in hood if n in survivors],
                                  "dropped": [n for n in hood if n in dropped]})
            content = RecordDict({HEADER_KEY: state.tag.header(UNMASK), UNMASK_KEY: lists})
            outgoing.append(self._message(state, node, UNMASK, content))
        seed_shares: dict[int, dict[int, bytes]] = {n: {} for n in survivors}
        key_shares: dict[int, dict[int, bytes]] = {n: {} for n in dropped}

        def read(holder: int, reply: Message) -> None:
            for kind, owners_of, bucket in (("seed", survivors, seed_shares),
                                            ("key", dropped, key_shares)):
                owners = config_field(reply.content, UNMASK_KEY, f"{kind}-owners", list, int)
                shares = config_field(reply.content, UNMASK_KEY, f"{kind}-shares", list, bytes)
                if len(owners) != len(shares):
                    raise SecAggError(f"{kind}-owners and {kind}-shares differ in length")
                for owner, share in zip(owners, shares):
                    if owner in owners_of and self._share_from(state, owner, holder, share):
                        bucket[owner][holder] = share

        self._exchange(state, UNMASK, outgoing, self.config.secagg_stage_timeout, result, read)

        masks = VectorMasks(state.dim, state.fixed.sum_bits, len(SCALARS))
        for node in sorted(survivors):
            seed = self._reconstruct(state, node, seed_shares[node], "self-mask seed")
            if seed_commitment(state.tag, node, seed) != state.commitments[node]:
                raise RoundAborted(f"the self-mask seed rebuilt for node {node} does not match "
                                   "its commitment (a holder sent a wrong share)")
            masks.add(state.values, state.scalars, derive(seed, SELF_MASK, state.tag.context), -1)
        for node in sorted(dropped):
            partners = [n for n in state.forwarded.get(node, []) if n in survivors]
            if not partners:
                continue
            private = self._reconstruct(state, node, key_shares[node], "mask key")
            if public_key_of(private) != state.keys[node][1]:
                raise RoundAborted(f"the mask key rebuilt for node {node} does not match its "
                                   "public key (a holder sent a wrong share)")
            for partner in partners:
                key = agree(private, state.keys[partner][1], PAIR_MASK, state.tag.context)
                masks.add(state.values, state.scalars, key, -pair_sign(partner, node))
        totals = decode_scalars(state.scalars)
        if totals["weight-units"] <= 0:
            raise RoundAborted("the surviving clients report no training examples")
        weighted_sum = state.fixed.decode_sum(state.values)
        result.mean_update = weighted_sum * (self.config.secagg_max_examples
                                             / totals["weight-units"])
        result.totals = totals
        result.contributors = sorted(survivors)

    # -- internals ---------------------------------------------------------------------

    def _exchange(self, state: _RoundState, stage: str, outgoing: list[Message], timeout: float,
                  result: SecureRound, read: Callable[[int, Message], None]) -> list[int]:
        """Send ``outgoing``; pass each reply of this round and stage to ``read``.

        Returns the nodes whose reply ``read`` accepted. A node that reports an error or
        does not answer in time is recorded as failed / timed out; a reply with a foreign
        header or one ``read`` refuses (SecAggError) is recorded as rejected and logged.
        """
        model_bytes: dict[int, int] = {}  # the model record is shared by all nodes' messages
        for message in outgoing if self.count_bytes else ():
            node = message.metadata.dst_node_id
            result.bytes_down[node] = result.bytes_down.get(node, 0) + \
                _content_bytes(message.content, model_bytes)
        expected = {m.metadata.dst_node_id for m in outgoing}
        answered, accepted = set(), []
        for reply in self.grid.send_and_receive(outgoing, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in expected or node in answered:
                log.warning("round %d: unexpected %s reply from node %d ignored",
                            state.tag.server_round, stage, node)
                continue
            answered.add(node)
            if reply.has_error():
                result.failed[node] = f"{stage}: {reply.error.reason}"
                log.warning("round %d: node %d failed at %s: %s", state.tag.server_round, node,
                            stage, reply.error.reason)
                continue
            if self.count_bytes:
                result.bytes_up[node] = result.bytes_up.get(node, 0) + \
                    wire.serialized_size(reply.content)
            try:
                state.tag.check(reply.content, stage)
                read(node, reply)
            except Exception as err:  # noqa: BLE001  any failure on one reply drops that reply
                reason = str(err) if isinstance(err, SecAggError) else \
                    f"unreadable reply ({type(err).__name__}: {err})"
                result.rejected[node] = f"{stage}: {reason}"
                log.warning("round %d: node %d dropped at %s: %s", state.tag.server_round, node,
                            stage, reason)
                continue
            accepted.append(node)
        for node in sorted(expected - answered):
            result.timed_out[node] = stage
            log.warning("round %d: node %d did not answer %s in time", state.tag.server_round,
                        node, stage)
        return sorted(accepted)

    def _message(self, state: _RoundState, node: int, stage: str, content: RecordDict) -> Message:
        return Message(content=content, dst_node_id=node, message_type=message_type(stage),
                       group_id=str(state.tag.server_round))

    def _neighbourhood(self, state: _RoundState, node: int) -> list[int]:
        return sorted([node, *state.neighbours[node]])

    def _share_from(self, state: _RoundState, owner: int, holder: int, share: bytes) -> bool:
        """A share is usable if it is the point of ``holder``'s position in ``owner``'s list."""
        hood = self._neighbourhood(state, owner)
        return (holder in hood and isinstance(share, bytes) and len(share) == shamir.SHARE_BYTES
                and int.from_bytes(share[: shamir.X_BYTES], "big") == hood.index(holder) + 1)

    def _reconstruct(self, state: _RoundState, owner: int, shares: dict[int, bytes],
                     what: str) -> bytes:
        if len(shares) < state.threshold:
            raise RoundAborted(f"{len(shares)} share(s) of node {owner}'s {what} arrived < "
                               f"threshold {state.threshold}")
        try:
            return shamir.combine(list(shares.values()), state.threshold)
        except SecAggError as err:
            raise RoundAborted(f"node {owner}'s {what}: {err}") from err

    def _require(self, state: _RoundState, count: int, stage: str) -> None:
        needed = max(state.threshold, self.min_clients)
        if count < needed:
            raise RoundAborted(f"{count} client(s) left after {stage} < {needed} "
                               f"(threshold {state.threshold}, min-train-nodes {self.min_clients})")


def _content_bytes(content: RecordDict, model_bytes: dict[int, int]) -> int:
    """Serialized size of ``content``; a model record seen before is not serialized again."""
    model = content.get(wire.ARRAYS_KEY)
    if model is None:
        return wire.serialized_size(content)
    if id(model) not in model_bytes:
        model_bytes[id(model)] = wire.serialized_size(RecordDict({wire.ARRAYS_KEY: model}))
    rest = RecordDict({key: record for key, record in content.items() if key != wire.ARRAYS_KEY})
    return model_bytes[id(model)] + wire.serialized_size(rest)


class SecureFederation(Federation):
    """The round loop with the uploads summed by SecAgg+ instead of collected one by one."""

    def __init__(self, *args, secagg: SecAggConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.secagg = secagg
        check_strategy(self.strategy)
        check_codec(str(self.train_config.get("upload-codec", "dense")))

    def collect_updates(self, messages: list[Message],
                        weights: OrderedDict[str, np.ndarray]) -> DecodedRound:
        dim = sum(array.size for array in weights.values())
        outcome = SecureAggregation(self.grid, self.secagg, self.cfg.round_timeout,
                                    self.cfg.min_train_nodes).run(messages, dim)
        decoded = DecodedRound(accepted=[], updates={}, rejected=outcome.rejected,
                               failed=outcome.failed, bytes_up=outcome.bytes_up,
                               timed_out=sorted(outcome.timed_out), refused=outcome.refused,
                               privacy=outcome.privacy,
                               contributors=len(outcome.contributors))
        decoded.summary = {
            "bytes_down_per_client": {str(k): v for k, v in outcome.bytes_down.items()},
            "secagg": {
                "aborted": outcome.aborted, "sum_bits": outcome.sum_bits,
                "threshold": outcome.threshold, "neighbours": outcome.neighbours,
                "clipped_values": outcome.totals.get("clipped", 0),
                "timed_out_at": {str(k): v for k, v in outcome.timed_out.items()},
                "stage_seconds": outcome.stage_seconds,
            },
        }
        if outcome.mean_update is not None:
            decoded.accepted = [self._aggregate_reply(outcome, weights, messages)]
        return decoded

    def _aggregate_reply(self, outcome: SecureRound, weights: OrderedDict[str, np.ndarray],
                         messages: list[Message]) -> Message:
        """One reply shaped like a client's: arrays = global + mean update, the totals."""
        arrays, offset = OrderedDict(), 0
        for name, array in weights.items():
            delta = outcome.mean_update[offset: offset + array.size].reshape(array.shape)
            arrays[name] = (array + delta).astype(array.dtype)
            offset += array.size
        totals = outcome.totals
        metrics = MetricRecord({
            wire.NUM_EXAMPLES: int(totals["examples"]),
            "train-loss": float(totals["train-loss"]),
            "train-accuracy": float(totals["train-accuracy"]),
            "secagg-clients": len(outcome.contributors),
            "secagg-clipped-values": int(totals["clipped"]),
        })
        content = RecordDict({self.arrays_key: wire.arrays_to_record(arrays),
                              wire.METRICS_KEY: metrics})
        first = messages[0].metadata
        return Message(content=content, metadata=Metadata(
            run_id=first.run_id, message_id="", src_node_id=0, dst_node_id=first.src_node_id,
            reply_to_message_id="", group_id=first.group_id, created_at=time.time(),
            ttl=first.ttl, message_type=first.message_type))


def federation_class(run_config, strategy: Strategy):
    """Federation, or SecureFederation bound to its settings when ``secure-aggregation``."""
    secagg = SecAggConfig.from_mapping(run_config)
    if not secagg.enabled:
        return Federation
    check_strategy(strategy)
    check_user_dp(UserLevelDPSettings.from_run_config(run_config))
    return functools.partial(SecureFederation, secagg=secagg)
