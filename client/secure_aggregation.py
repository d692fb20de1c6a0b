"""Client side of SecAgg+: the five stage handlers, registered on the ClientApp.

Deployment starts a fresh ClientApp process for every message, so everything a
client must remember between the stages of a round (its private keys, its
self-mask seed, the shares it holds) lives in ``context.state["secagg-state"]``,
never in module globals; the secrets are erased once the client has answered the
unmask stage, when it refuses a message, and when a message of another round
arrives.

In an authenticated round (``secagg-authenticated``, the default) the client signs
its keys and the survivor set with its institution's key and checks its neighbours'
signatures against the roster its site pinned (``sepal.secagg.identity``); the
threshold and neighbourhood floors it enforces are its site's (node config), not the
run's.

As in Bonawitz et al. and Flower, the client trains in the masked-input stage, so
no update waits in ``context.state`` (which deployment ships between the SuperNode
and every ClientApp process). That stage runs the ordinary train handler (local
training, DP, codec) and decodes its upload, so secure aggregation composes with
whatever that handler does; the update is then clipped, weighted and quantized
(``FixedPoint``) and leaves the client only masked. See ``sepal.secagg.protocol``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.settings import run_settings
from sepal import wire
from sepal.codecs import decode_upload
from sepal.codecs.downlink import DOWNLOAD_KEY, REFERENCE_KEY
from sepal.secagg import envelope, shamir
from sepal.secagg.errors import SecAggError
from sepal.secagg.fixedpoint import SCALARS, FixedPoint, encode_scalars, sum_bits
from sepal.secagg.identity import (
    SIGNATURE_BYTES,
    SitePolicy,
    keys_statement,
    survivors_digest,
    survivors_statement,
)
from sepal.secagg.keys import KeyPair, agree, check_public_key, derive
from sepal.secagg.masks import VectorMasks
from sepal.secagg.packing import pack
from sepal.secagg.protocol import (
    CONSISTENCY,
    CONSISTENCY_KEY,
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
    """Route the five ``train.secagg_*`` message types of ``app`` to the handlers."""
    app.train(ACTIONS[SETUP])(_erasing_on_failure(setup))
    app.train(ACTIONS[SHARE_KEYS])(_erasing_on_failure(share_keys))
    app.train(ACTIONS[MASKED_INPUT])(_erasing_on_failure(
        lambda msg, context: masked_input(msg, context, train)))
    app.train(ACTIONS[CONSISTENCY])(_erasing_on_failure(consistency))
    app.train(ACTIONS[UNMASK])(_erasing_on_failure(unmask))


def _erasing_on_failure(handler: Callable[[Message, Context], Message]):
    """A handler that, when it refuses or fails, first erases the open round's secrets."""
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except BaseException:
            erase_round(context)
            raise
    return run


def erase_round(context: Context) -> None:
    """Forget the open round: its private keys, seed and the shares held for others."""
    if STATE_KEY in context.state:
        del context.state[STATE_KEY]


def setup(msg: Message, context: Context) -> Message:
    """Check the round's parameters, make two fresh key pairs; send the public keys,
    signed with the institution's key in an authenticated round."""
    erase_round(context)  # a new round: whatever was open is over
    tag, stage = RoundTag.read(msg.content)
    if stage != SETUP or tag.run_id != msg.metadata.run_id:
        raise SecAggError(f"setup handler got a '{stage}' message of run {tag.run_id}")
    cfg = run_settings(context).secagg
    site = SitePolicy.from_mapping(context.node_config)
    if cfg.secagg_authenticated and not site.authenticated:
        raise SecAggError(
            "run config 'secagg-authenticated' = true needs this site's node config "
            "'secagg-identity' and 'secagg-roster' (issued by sepal-provision); a simulation, "
            "which has no provisioning, sets secagg-authenticated = false")
    if site.authenticated and not cfg.secagg_authenticated:
        raise SecAggError("this site holds a SecAgg identity (node config 'secagg-identity') "
                          "and takes part only in authenticated rounds; the run sets "
                          "'secagg-authenticated' = false")
    clients = config_field(msg.content, PARAMS_KEY, "clients", int)
    bits = config_field(msg.content, PARAMS_KEY, "sum-bits", int)
    if clients < 2 or bits != sum_bits(cfg.secagg_value_bits, clients):
        raise SecAggError(f"setup asks for {bits}-bit sums of {clients} clients; with "
                          f"secagg-value-bits {cfg.secagg_value_bits} that would wrap around")
    me = msg.metadata.dst_node_id
    envelope_keys, mask_keys = KeyPair.generate(), KeyPair.generate()
    context.state[STATE_KEY] = ConfigRecord({
        "run-id": tag.run_id, "server-round": tag.server_round, "round-id": tag.round_id,
        "stage": SETUP, "node": me, "sum-bits": bits, "clients": clients,
        "authenticated": site.authenticated,
        "envelope-private": envelope_keys.private, "envelope-public": envelope_keys.public,
        "mask-private": mask_keys.private, "mask-public": mask_keys.public,
    })
    keys = ConfigRecord({"envelope-key": envelope_keys.public, "mask-key": mask_keys.public})
    if site.authenticated:
        identity = site.identity()
        keys["institution"] = identity.name
        keys["signature"] = identity.sign(keys_statement(
            tag.context, me, identity.name, envelope_keys.public, mask_keys.public))
    return _reply(msg, tag, SETUP, {KEYS_KEY: keys})


def share_keys(msg: Message, context: Context) -> Message:
    """Secret-share the self-mask seed and the mask key among the neighbours, sealed for each."""
    state, tag = _state_for(msg, context, SHARE_KEYS)
    me = state["node"]
    nodes = config_field(msg.content, KEYS_KEY, "nodes", list, int)
    envelope_keys = config_field(msg.content, KEYS_KEY, "envelope-keys", list, bytes)
    mask_keys = config_field(msg.content, KEYS_KEY, "mask-keys", list, bytes)
    threshold = config_field(msg.content, KEYS_KEY, "threshold", int)
    _check_neighbourhood(state, context, msg.content, nodes, envelope_keys, mask_keys, threshold)
    institutions = _check_signed_keys(msg, context, tag, state, nodes, envelope_keys, mask_keys)

    seed = os.urandom(shamir.SECRET_BYTES)
    seed_shares = shamir.split(seed, threshold, len(nodes))
    key_shares = shamir.split(state["mask-private"], threshold, len(nodes))
    recipients, envelopes = [], []
    envelope_private = X25519PrivateKey.from_private_bytes(state["envelope-private"])
    for index, node in enumerate(nodes):
        if node == me:
            continue
        key = agree(envelope_private, envelope_keys[index], ENVELOPE_KEY, tag.context)
        associated = envelope.associated_data(tag.context, SHARE_KEYS, me, node)
        recipients.append(node)
        envelopes.append(envelope.seal(key, seed_shares[index] + key_shares[index], associated))

    own = nodes.index(me)
    state.update({
        "stage": SHARE_KEYS, "nodes": nodes, "envelope-keys": envelope_keys,
        "mask-keys": mask_keys, "institutions": institutions, "threshold": threshold,
        "seed": seed,
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
    envelope_private = X25519PrivateKey.from_private_bytes(state["envelope-private"])
    for sender, sealed in zip(senders, envelopes):
        index = nodes.index(sender)
        key = agree(envelope_private, state["envelope-keys"][index], ENVELOPE_KEY, tag.context)
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
    mask_private = X25519PrivateKey.from_private_bytes(state["mask-private"])
    for sender in senders:  # every sender the server forwarded, as the server will assume
        peer = state["mask-keys"][nodes.index(sender)]
        masks.add(values, scalars, agree(mask_private, peer, PAIR_MASK, tag.context),
                  pair_sign(me, sender))
    fixed_bits = state["sum-bits"]
    if fixed_bits < 8 * values.itemsize:
        np.bitwise_and(values, values.dtype.type((1 << fixed_bits) - 1), out=values)

    state.update({"stage": MASKED_INPUT, "masked-with": senders, "share-owners": owners,
                  "seed-shares": seed_shares, "key-shares": key_shares})
    masked = ArrayRecord({"values": _array(pack(values, fixed_bits)), "scalars": _array(scalars)})
    return _reply(msg, tag, MASKED_INPUT, {MASKED_KEY: masked, **privacy,
                                           REPORT_KEY: ConfigRecord({"bad-senders": bad})})


def consistency(msg: Message, context: Context) -> Message:
    """Sign the survivor set S the server shows this client (authenticated rounds)."""
    state, tag = _state_for(msg, context, CONSISTENCY)
    if not state["authenticated"]:
        raise SecAggError("consistency stage in a round this client runs unauthenticated")
    survivors = config_field(msg.content, CONSISTENCY_KEY, "survivors", list, int)
    _check_survivors(state, survivors)
    identity = SitePolicy.from_mapping(context.node_config).identity()
    signature = identity.sign(survivors_statement(tag.context, state["node"],
                                                  survivors_digest(survivors)))
    state.update({"stage": CONSISTENCY, "survivors": survivors})
    return _reply(msg, tag, CONSISTENCY,
                  {CONSISTENCY_KEY: ConfigRecord({"signature": signature})})


def unmask(msg: Message, context: Context) -> Message:
    """Reveal seed shares of the survivors and mask-key shares of the dropped, never both.

    Authenticated: S is the set this client signed, and at least t members of its
    neighbourhood (itself included) must have signed the same S.
    """
    state, tag = _state_for(msg, context, UNMASK)
    nodes = list(state["nodes"])
    if state["authenticated"]:
        survivors = list(state["survivors"])
        _check_consistency(msg, context, tag, state, survivors)
    else:
        survivors = config_field(msg.content, UNMASK_KEY, "survivors", list, int)
        _check_survivors(state, survivors)
    survived = set(survivors)
    hood_survivors = [node for node in nodes if node in survived]
    dropped = sorted(set(state["masked-with"]) - survived)

    held = {owner: i for i, owner in enumerate(state["share-owners"])}
    seed_owners = [node for node in hood_survivors if node in held]
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


PREVIOUS = {SHARE_KEYS: SETUP, MASKED_INPUT: SHARE_KEYS, CONSISTENCY: MASKED_INPUT}


def _state_for(msg: Message, context: Context, stage: str) -> tuple[ConfigRecord, RoundTag]:
    """This node's state of the round ``msg`` belongs to, which must be at the previous stage."""
    if STATE_KEY not in context.state:
        raise SecAggError(f"'{stage}' message, but this node has no secure-aggregation round open")
    state = context.state[STATE_KEY]
    tag = RoundTag(state["run-id"], state["server-round"], state["round-id"])
    tag.check(msg.content, stage)
    previous = PREVIOUS.get(stage) or (CONSISTENCY if state["authenticated"] else MASKED_INPUT)
    if state["stage"] != previous:
        raise SecAggError(f"'{stage}' message while this node is at stage '{state['stage']}' "
                          f"(expected '{previous}')")
    return state, tag


def _check_signed_keys(msg: Message, context: Context, tag: RoundTag, state: ConfigRecord,
                       nodes: list[int], envelope_keys: list[bytes],
                       mask_keys: list[bytes]) -> list[str]:
    """The neighbours' institutions, each having signed its node's keys for this round.

    Refuses (naming the node) keys without a signature from an institution of the
    site's roster: the server cannot substitute keys of its own, nor relay keys of
    another round or node, nor present one institution as two neighbours.
    """
    if not state["authenticated"]:
        return []
    institutions = config_field(msg.content, KEYS_KEY, "institutions", list, str)
    signatures = config_field(msg.content, KEYS_KEY, "signatures", list, bytes)
    if not len(institutions) == len(signatures) == len(nodes):
        raise SecAggError("institutions and signatures do not pair up with the neighbour list")
    identity = SitePolicy.from_mapping(context.node_config).identity()
    me, seen = state["node"], {}
    for node, institution, signature, key_a, key_b in zip(
            nodes, institutions, signatures, envelope_keys, mask_keys):
        if institution in seen:
            raise SecAggError(f"nodes {seen[institution]} and {node} both present keys of "
                              f"institution {institution!r}: refused")
        seen[institution] = node
        if node == me:
            if institution != identity.name:
                raise SecAggError("this node's own institution was altered")
            continue
        if len(signature) != SIGNATURE_BYTES:
            raise SecAggError(f"node {node}'s keys carry no valid signature: refused")
        identity.roster.verify(node, institution, signature,
                               keys_statement(tag.context, node, institution, key_a, key_b),
                               "round keys")
    return institutions


def _check_survivors(state: ConfigRecord, survivors: list[int]) -> None:
    """S must be sorted, hold this client and, within its neighbourhood, only neighbours it
    masked with, at least t of them."""
    me, nodes = state["node"], state["nodes"]
    if survivors != sorted(set(survivors)) or me not in survivors:
        raise SecAggError("the survivor set must be sorted, without repeats, and hold this node")
    if len(survivors) > state["clients"]:
        raise SecAggError(f"{len(survivors)} survivors, but only {state['clients']} client(s) "
                          "were said to take part at share-keys")
    hood = set(nodes) & set(survivors)
    if not hood - {me} <= set(state["masked-with"]):
        raise SecAggError(f"survivors {sorted(hood - {me} - set(state['masked-with']))} are not "
                          "among the neighbours this client masked with")
    if len(hood) < state["threshold"]:
        raise SecAggError(f"{len(hood)} survivor(s) in this neighbourhood < threshold "
                          f"{state['threshold']}: refusing to help unmask")


def _check_consistency(msg: Message, context: Context, tag: RoundTag, state: ConfigRecord,
                       survivors: list[int]) -> None:
    """At least t members of the neighbourhood (this client included) signed S."""
    signers = config_field(msg.content, UNMASK_KEY, "signers", list, int)
    signatures = config_field(msg.content, UNMASK_KEY, "signatures", list, bytes)
    if len(signers) != len(signatures):
        raise SecAggError("signers and signatures do not pair up one to one")
    roster = SitePolicy.from_mapping(context.node_config).identity().roster
    nodes, me = list(state["nodes"]), state["node"]
    digest, survived = survivors_digest(survivors), set(survivors)
    valid, refused = {me}, []
    for node, signature in zip(signers, signatures):
        if node in valid or node not in nodes or node not in survived:
            continue
        try:
            roster.verify(node, state["institutions"][nodes.index(node)], signature,
                          survivors_statement(tag.context, node, digest), "survivor set")
        except SecAggError as err:
            refused.append(str(err))
            continue
        valid.add(node)
    if len(valid) < state["threshold"]:
        detail = f" ({'; '.join(refused)})" if refused else ""
        raise SecAggError(f"only {len(valid)} member(s) of this neighbourhood signed the survivor "
                          f"set this client was shown < threshold {state['threshold']}: the "
                          f"server may be showing different sets; refusing to unmask{detail}")


def _check_neighbourhood(state, context, msg_content, nodes, envelope_keys, mask_keys,
                         threshold) -> None:
    me = state["node"]
    if not len(nodes) == len(envelope_keys) == len(mask_keys) or len(set(nodes)) != len(nodes):
        raise SecAggError("neighbour list and key lists do not pair up one to one")
    if nodes != sorted(nodes) or me not in nodes:
        raise SecAggError("neighbour list must be sorted and include this node")
    own = nodes.index(me)
    if (envelope_keys[own], mask_keys[own]) != (state["envelope-public"], state["mask-public"]):
        raise SecAggError("this node's own public keys were altered")
    site = SitePolicy.from_mapping(context.node_config)
    clients = config_field(msg_content, KEYS_KEY, "clients", int)  # those that answered setup
    if not 2 <= clients <= state["clients"]:
        raise SecAggError(f"{clients} client(s) said to remain of the {state['clients']} "
                          "announced at setup")
    floor_k = site.min_neighbours(clients)
    if not floor_k <= len(nodes) - 1 <= clients - 1:
        raise SecAggError(f"a neighbourhood of {len(nodes) - 1} neighbour(s) among the {clients} "
                          f"clients of this round; this site accepts {floor_k} to "
                          f"{clients - 1} (node config 'secagg-min-neighbour-factor' "
                          f"{site.secagg_min_neighbour_factor})")
    state["clients"] = clients
    for node, key_a, key_b in zip(nodes, envelope_keys, mask_keys):
        check_public_key(key_a, f"node {node}")
        check_public_key(key_b, f"node {node}")
    if len(set(envelope_keys) | set(mask_keys)) != 2 * len(nodes):
        raise SecAggError("two neighbours present the same public key")
    floor = site.min_threshold(len(nodes))
    if not floor <= threshold <= len(nodes):
        raise SecAggError(f"threshold {threshold} for a neighbourhood of {len(nodes)} is below "
                          f"this site's floor {floor} (node config 'secagg-min-threshold' "
                          f"{site.secagg_min_threshold}) or above it")


def _encoded_update(msg: Message, context: Context, reply: Message,
                    bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The train handler's update clipped, weighted and quantized in Z_(2^b), and the
    scalars (examples, weight, weighted loss and accuracy, clipped count) in Z_(2^64).

    The weight is min(examples, W) / W, or 1 for every client under user-level DP,
    whose noise is calibrated to an unweighted mean of clipped updates.
    """
    update, metrics = _decoded_update(msg, context, reply)
    settings = run_settings(context)
    cfg = settings.secagg
    examples = int(metrics[wire.NUM_EXAMPLES])
    cap = cfg.secagg_max_examples
    if settings.user_dp.enabled:
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
