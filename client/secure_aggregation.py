"""Client side of SecAgg+: the four stage handlers, registered on the ClientApp.

Deployment starts a fresh ClientApp process for every message, so everything a
client must remember between the stages of a round (its private keys, its
self-mask seed, the shares it holds) lives in ``context.state["secagg-state"]``,
never in module globals; the secrets are erased once the client has answered the
unmask stage.

As in Bonawitz et al. and Flower, the client trains in the masked-input stage, so
no update waits in ``context.state`` (which deployment ships between the SuperNode
and every ClientApp process). That stage runs the ordinary train handler (local
training, DP, codec) and decodes its upload, so secure aggregation composes with
whatever that handler does; the update is then clipped, weighted and quantized
(``FixedPoint``) and leaves the client only masked. See ``sepal.secagg.protocol``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from sepal import wire
from sepal.codecs import decode_upload
from sepal.codecs.downlink import DOWNLOAD_KEY, REFERENCE_KEY
from sepal.privacy import UserLevelDPSettings
from sepal.secagg import envelope, graph, shamir
from sepal.secagg.config import SecAggConfig
from sepal.secagg.errors import SecAggError
from sepal.secagg.fixedpoint import SCALARS, FixedPoint, encode_scalars, sum_bits
from sepal.secagg.keys import KeyPair, agree, check_public_key, derive
from sepal.secagg.masks import VectorMasks
from sepal.secagg.packing import pack
from sepal.secagg.protocol import (
    ENVELOPE_KEY,
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
    ACTIONS,
    RoundTag,
    config_field,
    pair_sign,
    seed_commitment,
)

log = logging.getLogger("sepal.client")

STATE_KEY = "secagg-state"
SECRET_FIELDS = ("envelope-private", "mask-private", "seed", "seed-shares", "key-shares")

TrainHandler = Callable[[Message, Context], Message]


def register_secure_aggregation(app: ClientApp, train: TrainHandler) -> None:
    """Route the four ``train.secagg_*`` message types of ``app`` to the handlers."""
    app.train(ACTIONS[SETUP])(setup)
    app.train(ACTIONS[SHARE_KEYS])(share_keys)
    app.train(ACTIONS[MASKED_INPUT])(lambda msg, context: masked_input(msg, context, train))
    app.train(ACTIONS[UNMASK])(unmask)


def setup(msg: Message, context: Context) -> Message:
    """Check the round's parameters, make two fresh key pairs; send the public keys."""
    tag, stage = RoundTag.read(msg.content)
    if stage != SETUP or tag.run_id != msg.metadata.run_id:
        raise SecAggError(f"setup handler got a '{stage}' message of run {tag.run_id}")
    cfg = SecAggConfig.from_mapping(context.run_config)
    clients = config_field(msg.content, PARAMS_KEY, "clients", int)
    bits = config_field(msg.content, PARAMS_KEY, "sum-bits", int)
    if clients < 2 or bits != sum_bits(cfg.secagg_value_bits, clients):
        raise SecAggError(f"setup asks for {bits}-bit sums of {clients} clients; with "
                          f"secagg-value-bits {cfg.secagg_value_bits} that would wrap around")
    envelope_keys, mask_keys = KeyPair.generate(), KeyPair.generate()
    context.state[STATE_KEY] = ConfigRecord({
        "run-id": tag.run_id, "server-round": tag.server_round, "round-id": tag.round_id,
        "stage": SETUP, "node": msg.metadata.dst_node_id, "sum-bits": bits,
        "envelope-private": envelope_keys.private, "envelope-public": envelope_keys.public,
        "mask-private": mask_keys.private, "mask-public": mask_keys.public,
    })
    keys = ConfigRecord({"envelope-key": envelope_keys.public, "mask-key": mask_keys.public})
    return _reply(msg, tag, SETUP, {KEYS_KEY: keys})


def share_keys(msg: Message, context: Context) -> Message:
    """Secret-share the self-mask seed and the mask key among the neighbours, sealed for each."""
    state, tag = _state_for(msg, context, SHARE_KEYS)
    me = state["node"]
    nodes = config_field(msg.content, KEYS_KEY, "nodes", list, int)
    envelope_keys = config_field(msg.content, KEYS_KEY, "envelope-keys", list, bytes)
    mask_keys = config_field(msg.content, KEYS_KEY, "mask-keys", list, bytes)
    threshold = config_field(msg.content, KEYS_KEY, "threshold", int)
    _check_neighbourhood(state, context, nodes, envelope_keys, mask_keys, threshold)

    seed = os.urandom(shamir.SECRET_BYTES)
    seed_shares = shamir.split(seed, threshold, len(nodes))
    key_shares = shamir.split(state["mask-private"], threshold, len(nodes))
    recipients, envelopes = [], []
    for index, node in enumerate(nodes):
        if node == me:
            continue
        key = agree(state["envelope-private"], envelope_keys[index], ENVELOPE_KEY, tag.context)
        associated = envelope.associated_data(tag.context, SHARE_KEYS, me, node)
        recipients.append(node)
        envelopes.append(envelope.seal(key, seed_shares[index] + key_shares[index], associated))

    own = nodes.index(me)
    state.update({
        "stage": SHARE_KEYS, "nodes": nodes, "envelope-keys": envelope_keys,
        "mask-keys": mask_keys, "threshold": threshold, "seed": seed,
        "share-owners": [me], "seed-shares": [seed_shares[own]], "key-shares": [key_shares[own]],
    })
    shares = ConfigRecord({"recipients": recipients, "envelopes": envelopes,
                           "seed-commitment": seed_commitment(tag, me, seed)})
    return _reply(msg, tag, SHARE_KEYS, {SHARES_KEY: shares})


def masked_input(msg: Message, context: Context, train: TrainHandler) -> Message:
    """Open the neighbours' envelopes, train, upload the update under self and pairwise masks."""
    state, tag = _state_for(msg, context, MASKED_INPUT)
    me, nodes = state["node"], list(state["nodes"])
    senders = config_field(msg.content, SHARES_KEY, "senders", list, int)
    envelopes = config_field(msg.content, SHARES_KEY, "envelopes", list, bytes)
    if len(senders) != len(envelopes) or len(set(senders)) != len(senders):
        raise SecAggError("senders and envelopes do not pair up one to one")
    if not set(senders) <= set(nodes) - {me}:
        raise SecAggError(f"envelopes from non-neighbours {sorted(set(senders) - set(nodes))}")
    if len(senders) + 1 < state["threshold"]:
        raise SecAggError(f"only {len(senders)} neighbour(s) shared keys; threshold "
                          f"{state['threshold']} cannot be met")

    owners, seed_shares, key_shares = list(state["share-owners"]), list(state["seed-shares"]), \
        list(state["key-shares"])
    bad = []
    for sender, sealed in zip(senders, envelopes):
        index = nodes.index(sender)
        key = agree(state["envelope-private"], state["envelope-keys"][index], ENVELOPE_KEY,
                    tag.context)
        try:
            plain = envelope.open_envelope(
                key, sealed, envelope.associated_data(tag.context, SHARE_KEYS, sender, me))
            seed_share, key_share = _split_plaintext(plain)
        except SecAggError as err:
            log.warning("secure aggregation: envelope from node %d rejected: %s", sender, err)
            bad.append(sender)
            continue
        owners.append(sender)
        seed_shares.append(seed_share)
        key_shares.append(key_share)

    reply = train(msg, context)
    if reply.has_error():
        raise SecAggError(f"local training failed: {reply.error.reason}")
    privacy = {key: reply.content[key] for key in (wire.PRIVACY_KEY, wire.REFUSAL_KEY)
               if key in reply.content}
    if wire.REFUSAL_KEY in reply.content:  # the site's privacy budget: no input this round
        state["stage"] = MASKED_INPUT
        return _reply(msg, tag, MASKED_INPUT, privacy)
    values, scalars = _encoded_update(msg, context, reply, state["sum-bits"])
    masks = VectorMasks(values.size, state["sum-bits"], len(SCALARS))
    masks.add(values, scalars, derive(state["seed"], SELF_MASK, tag.context))
    for sender in senders:  # every sender the server forwarded, as the server will assume
        peer = state["mask-keys"][nodes.index(sender)]
        masks.add(values, scalars, agree(state["mask-private"], peer, PAIR_MASK, tag.context),
                  pair_sign(me, sender))
    fixed_bits = state["sum-bits"]
    if fixed_bits < 8 * values.itemsize:
        np.bitwise_and(values, values.dtype.type((1 << fixed_bits) - 1), out=values)

    state.update({"stage": MASKED_INPUT, "masked-with": senders, "share-owners": owners,
                  "seed-shares": seed_shares, "key-shares": key_shares})
    masked = ArrayRecord({"values": _array(pack(values, fixed_bits)), "scalars": _array(scalars)})
    return _reply(msg, tag, MASKED_INPUT, {MASKED_KEY: masked, **privacy,
                                           REPORT_KEY: ConfigRecord({"bad-senders": bad})})


def unmask(msg: Message, context: Context) -> Message:
    """Reveal seed shares of the survivors and mask-key shares of the dropped, never both."""
    state, tag = _state_for(msg, context, UNMASK)
    me = state["node"]
    survivors = config_field(msg.content, UNMASK_KEY, "survivors", list, int)
    dropped = config_field(msg.content, UNMASK_KEY, "dropped", list, int)
    masked_with = set(state["masked-with"])
    if set(survivors) & set(dropped):
        raise SecAggError(f"nodes {sorted(set(survivors) & set(dropped))} are listed both as "
                          "survivors and as dropped: refusing to reveal both of their secrets")
    if me not in survivors or not set(survivors) - {me} <= masked_with \
            or not set(dropped) <= masked_with:
        raise SecAggError("survivors/dropped are not among the neighbours this client masked with")
    if len(survivors) < state["threshold"]:
        raise SecAggError(f"{len(survivors)} survivor(s) < threshold {state['threshold']}: "
                          "refusing to help unmask")

    held = {owner: i for i, owner in enumerate(state["share-owners"])}
    seed_owners = [node for node in survivors if node in held]
    key_owners = [node for node in dropped if node in held]
    shares = ConfigRecord({
        "seed-owners": seed_owners,
        "seed-shares": [state["seed-shares"][held[node]] for node in seed_owners],
        "key-owners": key_owners,
        "key-shares": [state["key-shares"][held[node]] for node in key_owners],
    })
    for field in SECRET_FIELDS:
        del state[field]
    state["stage"] = UNMASK
    return _reply(msg, tag, UNMASK, {UNMASK_KEY: shares})


PREVIOUS = {SHARE_KEYS: SETUP, MASKED_INPUT: SHARE_KEYS, UNMASK: MASKED_INPUT}


def _state_for(msg: Message, context: Context, stage: str) -> tuple[ConfigRecord, RoundTag]:
    """This node's state of the round ``msg`` belongs to, which must be at the previous stage."""
    if STATE_KEY not in context.state:
        raise SecAggError(f"'{stage}' message, but this node has no secure-aggregation round open")
    state = context.state[STATE_KEY]
    tag = RoundTag(state["run-id"], state["server-round"], state["round-id"])
    tag.check(msg.content, stage)
    if state["stage"] != PREVIOUS[stage]:
        raise SecAggError(f"'{stage}' message while this node is at stage '{state['stage']}' "
                          f"(expected '{PREVIOUS[stage]}')")
    return state, tag


def _check_neighbourhood(state, context, nodes, envelope_keys, mask_keys, threshold) -> None:
    me = state["node"]
    if not len(nodes) == len(envelope_keys) == len(mask_keys) or len(set(nodes)) != len(nodes):
        raise SecAggError("neighbour list and key lists do not pair up one to one")
    if nodes != sorted(nodes) or me not in nodes:
        raise SecAggError("neighbour list must be sorted and include this node")
    own = nodes.index(me)
    if (envelope_keys[own], mask_keys[own]) != (state["envelope-public"], state["mask-public"]):
        raise SecAggError("this node's own public keys were altered")
    for node, key_a, key_b in zip(nodes, envelope_keys, mask_keys):
        check_public_key(key_a, f"node {node}")
        check_public_key(key_b, f"node {node}")
    if len(set(envelope_keys) | set(mask_keys)) != 2 * len(nodes):
        raise SecAggError("two neighbours present the same public key")
    fraction = SecAggConfig.from_mapping(context.run_config).secagg_threshold
    floor = graph.threshold_for(len(nodes), fraction)
    if not floor <= threshold <= len(nodes):
        raise SecAggError(f"threshold {threshold} for a neighbourhood of {len(nodes)} is below "
                          f"this run's floor {floor} (secagg-threshold {fraction}) or above it")


def _encoded_update(msg: Message, context: Context, reply: Message,
                    bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The train handler's update clipped, weighted and quantized in Z_(2^b), and the
    scalars (examples, weight, weighted loss and accuracy, clipped count) in Z_(2^64).

    The weight is min(examples, W) / W, or 1 for every client under user-level DP,
    whose noise is calibrated to an unweighted mean of clipped updates.
    """
    update, metrics = _decoded_update(msg, context, reply)
    cfg = SecAggConfig.from_mapping(context.run_config)
    examples = int(metrics[wire.NUM_EXAMPLES])
    cap = cfg.secagg_max_examples
    if UserLevelDPSettings.from_run_config(context.run_config).enabled:
        weight_units = cap
    else:
        weight_units = min(examples, cap)
        if examples > cap:
            log.info("secure aggregation: %d examples weigh as secagg-max-examples = %d",
                     examples, cap)
    fixed = FixedPoint(cfg.secagg_clip, cfg.secagg_value_bits, bits)
    values, clipped = fixed.encode(update, weight_units / cap, np.random.default_rng())
    if clipped:
        log.info("secure aggregation: %d of %d update values clipped to +-%g", clipped,
                 values.size, cfg.secagg_clip)
    scalars = encode_scalars(examples, weight_units,
                             float(metrics.get("train-loss", float("nan"))),
                             float(metrics.get("train-accuracy", float("nan"))), clipped)
    return values, scalars


def _decoded_update(msg: Message, context: Context,
                    reply: Message) -> tuple[list[np.ndarray], object]:
    """The update's tensors in the order of the global model's, and the reply's metrics."""
    # with a compressed downlink the model is the reference the train handler rebuilt
    model = context.state[REFERENCE_KEY] if DOWNLOAD_KEY in msg.content \
        else msg.content[wire.ARRAYS_KEY]
    shapes = {name: tuple(array.shape) for name, array in model.items()}
    update = decode_upload(reply.content[wire.UPDATE_KEY], reply.content[wire.CODEC_KEY], shapes)
    for name, tensor in update.items():
        if not np.isfinite(tensor).all():
            raise SecAggError(f"the local update of '{name}' holds NaN or Inf; not taking part "
                              "in this round")
    return [update[name] for name in shapes], reply.content[wire.METRICS_KEY]


def _split_plaintext(plain: bytes) -> tuple[bytes, bytes]:
    """The seed share and the mask-key share; both must be the same point index.

    Which index is right depends on the sender's neighbourhood, which this client does
    not know; the server checks it when it uses the share.
    """
    if len(plain) != 2 * shamir.SHARE_BYTES:
        raise SecAggError("envelope holds a plaintext of the wrong length")
    seed_share, key_share = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:]
    if seed_share[: shamir.X_BYTES] != key_share[: shamir.X_BYTES]:
        raise SecAggError("envelope holds shares of two different indices")
    return seed_share, key_share


def _array(values: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(values))


def _reply(msg: Message, tag: RoundTag, stage: str, records: dict) -> Message:
    return Message(content=RecordDict({HEADER_KEY: tag.header(stage), **records}), reply_to=msg)
