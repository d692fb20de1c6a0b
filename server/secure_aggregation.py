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
aggregate, such as central-DP noise, which counts the reply as its ``aggregated-clients``
contributors) aggregate the unmasked mean unchanged. Strategies that need the
individual updates (median, trimmed mean, Krum, MultiKrum, Bulyan, q-FedAvg,
server-side DP clipping) and adaptive user-level DP are refused at start-up.

Clients that fail, time out or send a malformed, replayed or unauthenticated
message are dropped and logged; if fewer than t clients remain at any stage, or a
secret lacks t shares, the round is abandoned without unmasking anything and the
global model is kept. A wrong share is outvoted (other t-subsets are tried and the
holder is named); a client's accusation that an envelope failed drops nobody.

Clients are not trusted with what they sum: the unmasked result must lie within what
|S| honest clients can produce (summed weight, examples, loss and accuracy sums and
every coordinate), else the round's aggregate is refused with the reason in metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from sepal import wire
from sepal.privacy import UserLevelDPConfig
from sepal.privacy.refusal import Refusal, read_reply_privacy
from sepal.secagg import graph, shamir
from sepal.secagg.config import SecAggConfig
from sepal.secagg.errors import RoundAborted, SecAggError
from sepal.secagg.fixedpoint import (
    MAX_LOSS,
    SCALAR_FRACTION,
    SCALARS,
    FixedPoint,
    decode_scalars,
)
from sepal.secagg.identity import SIGNATURE_BYTES
from sepal.secagg.keys import agree, check_public_key, derive, public_key_of
from sepal.secagg.masks import VectorMasks
from sepal.secagg.packing import add_packed, packed_size
from sepal.secagg.protocol import (
    CONSISTENCY,
    CONSISTENCY_KEY,
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
from server.uploads import CLIENTS_KEY, DecodedRound, aggregate_reply

log = logging.getLogger("sepal.server")

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
    accusations: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # accused -> by
    bad_shares: dict[int, str] = dataclasses.field(default_factory=dict)  # holder -> which
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
    # node -> {member of its neighbourhood (itself included): that member's share index}
    hoods: dict[int, dict[int, int]] = dataclasses.field(default_factory=dict)
    keys: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)
    signed_keys: dict[int, tuple[str, bytes]] = dataclasses.field(default_factory=dict)
    survivor_signatures: dict[int, bytes] = dataclasses.field(default_factory=dict)
    commitments: dict[int, bytes] = dataclasses.field(default_factory=dict)
    forwarded: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    values: np.ndarray | None = None
    scalars: np.ndarray | None = None
    dropped: list[int] = dataclasses.field(default_factory=list)
    unmaskers: list[int] = dataclasses.field(default_factory=list)  # signed S (authenticated)


class SecureAggregation:
    """Drives one SecAgg+ round through the Grid (five ``train.secagg_*`` stages; four
    when unauthenticated)."""

    def __init__(self, grid: Grid, config: SecAggConfig, train_timeout: float,
                 min_clients: int = 2, count_bytes: bool = True, user_dp: bool = False):
        self.grid = grid
        self.config = config
        self.user_dp = user_dp  # every client weighs W (user-level DP)
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
        stages = [(SETUP, lambda: self.setup(state, result)),
                  (SHARE_KEYS, lambda: self.share_keys(state, result)),
                  (MASKED_INPUT, lambda: self.masked_input(state, messages, result)),
                  (CONSISTENCY, lambda: self.consistency(state, result)),
                  (UNMASK, lambda: self.unmask(state, result))]
        if not self.config.secagg_authenticated:
            stages.pop(3)
        try:
            self._require(state, len(nodes), "sampled")
            for stage, step in stages:
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
        institutions: dict[str, int] = {}

        def read(node: int, reply: Message) -> None:
            envelope_key = config_field(reply.content, KEYS_KEY, "envelope-key", bytes)
            mask_key = config_field(reply.content, KEYS_KEY, "mask-key", bytes)
            check_public_key(envelope_key, f"node {node}")
            check_public_key(mask_key, f"node {node}")
            if {envelope_key, mask_key} & seen_keys or envelope_key == mask_key:
                raise SecAggError("public key already presented in this round")
            if self.config.secagg_authenticated:
                institution = config_field(reply.content, KEYS_KEY, "institution", str)
                signature = config_field(reply.content, KEYS_KEY, "signature", bytes)
                if len(signature) != SIGNATURE_BYTES:
                    raise SecAggError(f"signature must be {SIGNATURE_BYTES} bytes")
                if institution in institutions:
                    raise SecAggError(f"institution {institution!r} already answered as node "
                                      f"{institutions[institution]}")
                institutions[institution] = node
                state.signed_keys[node] = (institution, signature)
            seen_keys.update((envelope_key, mask_key))
            state.keys[node] = (envelope_key, mask_key)

        self._exchange(state, SETUP, outgoing, self.config.secagg_stage_timeout, result, read)
        state.active = sorted(state.keys)
        self._require(state, len(state.active), "setup")
        state.k = graph.neighbour_count(len(state.active), state.k)
        state.neighbours = graph.build_graph(state.active, state.k)
        state.hoods = {node: {member: index for index, member in
                              enumerate(sorted([node, *neighbours]), start=1)}
                       for node, neighbours in state.neighbours.items()}

    def share_keys(self, state: _RoundState, result: SecureRound) -> None:
        """Send each client its neighbours' keys; collect the envelopes of its shares."""
        outgoing = []
        for node in state.active:
            hood = self._neighbourhood(state, node)
            keys = ConfigRecord({
                "nodes": hood, "threshold": state.threshold, "clients": len(state.active),
                "envelope-keys": [state.keys[n][0] for n in hood],
                "mask-keys": [state.keys[n][1] for n in hood],
            })
            if self.config.secagg_authenticated:
                keys["institutions"] = [state.signed_keys[n][0] for n in hood]
                keys["signatures"] = [state.signed_keys[n][1] for n in hood]
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
        accused: dict[int, set[int]] = {}

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
                    accused.setdefault(sender, set()).add(node)

        self._exchange(state, MASKED_INPUT, outgoing, self.train_timeout, result, read)
        for sender, accusers in sorted(accused.items()):
            result.accusations[sender] = sorted(accusers)
            log.warning("round %d: node(s) %s could not open the share envelope of node %d "
                        "(tampered in transit, or sent wrong); it stays, its secrets are "
                        "rebuilt from the other holders", state.tag.server_round,
                        sorted(accusers), sender)
        survivors = sorted(inputs)
        self._require(state, len(survivors), "masked-input")
        state.dropped = [node for node in state.active if node not in inputs]
        for node in survivors + state.dropped:
            holders = [member for member in state.hoods[node] if member in inputs]
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

    def consistency(self, state: _RoundState, result: SecureRound) -> None:
        """Show every survivor the survivor set S; collect each one's signature on it."""
        survivors = list(state.active)
        shown = ConfigRecord({"survivors": survivors})  # one record for all: checked once
        outgoing = []
        for node in survivors:
            content = RecordDict({HEADER_KEY: state.tag.header(CONSISTENCY),
                                  CONSISTENCY_KEY: shown})
            outgoing.append(self._message(state, node, CONSISTENCY, content))

        def read(node: int, reply: Message) -> None:
            signature = config_field(reply.content, CONSISTENCY_KEY, "signature", bytes)
            if len(signature) != SIGNATURE_BYTES:
                raise SecAggError(f"signature must be {SIGNATURE_BYTES} bytes")
            state.survivor_signatures[node] = signature

        signers = self._exchange(state, CONSISTENCY, outgoing, self.config.secagg_stage_timeout,
                                 result, read)
        self._require(state, len(signers), "consistency")
        state.unmaskers = signers

    def unmask(self, state: _RoundState, result: SecureRound) -> None:
        """Collect shares; remove the survivors' self masks and the dropped' pairwise masks."""
        survivors, dropped = set(state.active), set(state.dropped)
        survivor_set = None if self.config.secagg_authenticated else \
            ConfigRecord({"survivors": state.active})  # one record for all: checked once
        outgoing = []
        for node in state.unmaskers or state.active:
            if self.config.secagg_authenticated:
                signers = [n for n in self._neighbourhood(state, node)
                           if n in state.survivor_signatures]
                record = ConfigRecord({
                    "signers": signers,
                    "signatures": [state.survivor_signatures[n] for n in signers]})
            else:
                record = survivor_set
            content = RecordDict({HEADER_KEY: state.tag.header(UNMASK), UNMASK_KEY: record})
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
            seed = self._reconstruct(
                state, result, node, seed_shares[node], "self-mask seed",
                lambda secret, node=node: seed_commitment(state.tag, node, secret)
                == state.commitments[node])
            masks.add(state.values, state.scalars, derive(seed, SELF_MASK, state.tag.context), -1)
        for node in sorted(dropped):
            partners = [n for n in state.forwarded.get(node, []) if n in survivors]
            if not partners:
                continue
            private = self._reconstruct(
                state, result, node, key_shares[node], "mask key",
                lambda secret, node=node: public_key_of(secret) == state.keys[node][1])
            for partner in partners:
                key = agree(private, state.keys[partner][1], PAIR_MASK, state.tag.context)
                masks.add(state.values, state.scalars, key, -pair_sign(partner, node))
        totals = decode_scalars(state.scalars)
        weighted_sum = state.fixed.decode_sum(state.values)
        self._check_bounds(state, totals, weighted_sum, len(survivors))
        result.mean_update = weighted_sum * (self.config.secagg_max_examples
                                             / totals["weight-units"])
        result.totals = totals
        result.contributors = sorted(survivors)

    def _check_bounds(self, state: _RoundState, totals: dict[str, float],
                      weighted_sum: np.ndarray, count: int) -> None:
        """Abort unless the unmasked sums are what ``count`` honest clients can produce.

        With W = secagg-max-examples, V levels and step c / V, honest client i adds
        w_i <= W weight units (w_i <= n_i; w_i = W under user-level DP) and per
        coordinate an integer of magnitude <= ceil(w_i V / W), so the weighted sum of a
        coordinate lies within (sum_i w_i V / W + count) steps and within count V steps.
        """
        cap, levels, step = self.config.secagg_max_examples, state.fixed.levels, state.fixed.step
        weight, examples = int(totals["weight-units"]), int(totals["examples"])
        forged = "a client forged its contribution"
        if not 0 < weight <= count * cap:
            raise RoundAborted(f"summed weight {weight} units is outside (0, {count} x "
                               f"secagg-max-examples = {count * cap}]: {forged}")
        if self.user_dp and weight != count * cap:
            raise RoundAborted(f"summed weight {weight} units != {count} x {cap} under "
                               f"user-level DP (every client weighs W): {forged}")
        if not self.user_dp and not weight <= examples < 2**62:
            raise RoundAborted(f"summed examples {examples} is below the summed weight {weight} "
                               f"units or implausibly large: {forged}")
        loss_sum, accuracy_sum = (int(v) for v in state.scalars[2:4])  # rounded per client
        if loss_sum > weight * MAX_LOSS * SCALAR_FRACTION + count \
                or accuracy_sum > weight * SCALAR_FRACTION + count \
                or int(state.scalars[4]) > count * state.dim:
            raise RoundAborted(f"summed loss, accuracy or clipped count out of range: {forged}")
        limit = min(count * levels, math.ceil(weight * levels / cap) + count) * step
        largest = float(np.abs(weighted_sum).max()) if weighted_sum.size else 0.0
        if largest > limit * (1 + 1e-6):
            raise RoundAborted(f"an unmasked coordinate sum {largest:.4g} exceeds what {count} "
                               f"honest client(s) of summed weight {weight / cap:.4g} can "
                               f"produce ({limit:.4g}): {forged}")

    # -- helpers -----------------------------------------------------------------------
    # -- internals ---------------------------------------------------------------------

    def _exchange(self, state: _RoundState, stage: str, outgoing: list[Message], timeout: float,
                  result: SecureRound, read: Callable[[int, Message], None]) -> list[int]:
        """Send ``outgoing``; pass each reply of this round and stage to ``read``.

        Returns the nodes whose reply ``read`` accepted. A node that reports an error or
        does not answer in time is recorded as failed / timed out; a reply with a foreign
        header or one ``read`` refuses (SecAggError) is recorded as rejected and logged.
        """
        for message in outgoing if self.count_bytes else ():
            node = message.metadata.dst_node_id
            result.bytes_down[node] = result.bytes_down.get(node, 0) + \
                wire.serialized_size(message.content)
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
        return list(state.hoods[node])

    def _share_from(self, state: _RoundState, owner: int, holder: int, share: bytes) -> bool:
        """A share is usable if it is the point of ``holder``'s position in ``owner``'s list."""
        index = state.hoods[owner].get(holder)
        return (index is not None and isinstance(share, bytes)
                and len(share) == shamir.SHARE_BYTES
                and int.from_bytes(share[: shamir.X_BYTES], "big") == index)

    def _reconstruct(self, state: _RoundState, result: SecureRound, owner: int,
                     shares: dict[int, bytes], what: str,
                     accept: Callable[[bytes], bool]) -> bytes:
        """The secret ``accept`` confirms; holders of shares off its polynomial are named."""
        if len(shares) < state.threshold:
            raise RoundAborted(f"{len(shares)} share(s) of node {owner}'s {what} arrived < "
                               f"threshold {state.threshold}")
        try:
            secret, bad = shamir.robust_combine(shares, state.threshold, accept)
        except SecAggError as err:
            raise RoundAborted(f"node {owner}'s {what}: {err}") from err
        for holder in bad:
            result.bad_shares[holder] = f"sent a wrong share of node {owner}'s {what}"
            log.warning("round %d: node %d sent a wrong share of node %d's %s; rebuilt from "
                        "the others", state.tag.server_round, holder, owner, what)
        return secret

    def _require(self, state: _RoundState, count: int, stage: str) -> None:
        needed = max(state.threshold, self.min_clients)
        if count < needed:
            raise RoundAborted(f"{count} client(s) left after {stage} < {needed} "
                               f"(threshold {state.threshold}, min-train-nodes {self.min_clients})")


class SecureFederation(Federation):
    """The round loop with the uploads summed by SecAgg+ instead of collected one by one."""

    def __init__(self, *args, secagg: SecAggConfig, user_dp: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.secagg = secagg
        self.user_dp = user_dp

    def collect_updates(self, messages: list[Message],
                        weights: OrderedDict[str, np.ndarray]) -> DecodedRound:
        dim = sum(array.size for array in weights.values())
        outcome = SecureAggregation(self.grid, self.secagg, self.cfg.round_timeout,
                                    self.cfg.min_train_nodes, user_dp=self.user_dp).run(
                                        messages, dim)
        if outcome.mean_update is not None:
            self._validate_mean(outcome, weights)
        decoded = DecodedRound(accepted=[], rejected=outcome.rejected,
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
                "accusations": {str(k): v for k, v in outcome.accusations.items()},
                "bad_shares": {str(k): v for k, v in outcome.bad_shares.items()},
            },
        }
        if outcome.mean_update is not None:
            decoded.accepted = [self._aggregate_reply(outcome, weights, messages)]
        return decoded

    def _validate_mean(self, outcome: SecureRound,
                       weights: OrderedDict[str, np.ndarray]) -> None:
        """The update validator on the unmasked mean; a defect refuses the aggregate."""
        update = _split(outcome.mean_update, weights)
        try:
            self.validator.check(update, weights)
            defect = self.validator.check_norms({0: update}).get(0)
        except wire.UploadError as err:
            defect = str(err)
        if defect is not None:
            outcome.aborted = f"the unmasked mean update fails validation: {defect}"
            outcome.mean_update = None
            log.warning("secure aggregation: aggregate refused, global model kept: %s",
                        outcome.aborted)

    def _aggregate_reply(self, outcome: SecureRound, weights: OrderedDict[str, np.ndarray],
                         messages: list[Message]) -> Message:
        """One reply shaped like a client's: arrays = global + mean update, the totals."""
        deltas = _split(outcome.mean_update, weights)
        arrays = OrderedDict((name, (array + deltas[name]).astype(array.dtype))
                             for name, array in weights.items())
        totals = outcome.totals
        metrics = MetricRecord({
            wire.NUM_EXAMPLES: int(totals["examples"]),
            "train-loss": float(totals["train-loss"]),
            "train-accuracy": float(totals["train-accuracy"]),
            CLIENTS_KEY: len(outcome.contributors),
            "secagg-clipped-values": int(totals["clipped"]),
        })
        return aggregate_reply(self.arrays_key, arrays, metrics, messages)


def _split(flat: np.ndarray, like: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """``flat`` cut into tensors shaped like ``like``'s (views, no copies)."""
    parts, offset = OrderedDict(), 0
    for name, array in like.items():
        parts[name] = flat[offset: offset + array.size].reshape(array.shape)
        offset += array.size
    return parts


def federation_class(secagg: SecAggConfig, user_dp: UserLevelDPConfig):
    """Federation, or SecureFederation bound to its settings when ``secure-aggregation``."""
    if not secagg.enabled:
        return Federation
    return functools.partial(SecureFederation, secagg=secagg, user_dp=user_dp.enabled)
