"""Secure aggregation against an actively malicious server and malicious clients.

Each test is one attack driven through the real server workflow and the real client
handlers (``testing.grid.InProcessGrid``, real cryptography): the server's deviations
are edits of what it sends (``on_instruction``), a malicious client's are edits of what
it uploads (``on_reply``). Every attack must fail with a reason that names what was refused,
while the honest part of the round still aggregates where it can.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from client.secure_aggregation import STATE_KEY
from sepal.config import ConfigError, RunConfig
from sepal.secagg import shamir
from sepal.secagg.config import SecAggConfig
from sepal.secagg.fixedpoint import FixedPoint
from sepal.secagg.identity import keys_statement, new_signing_key
from sepal.secagg.keys import KeyPair
from sepal.secagg.packing import pack, unpack
from sepal.secagg.protocol import (
    CONSISTENCY,
    CONSISTENCY_KEY,
    HEADER_KEY,
    KEYS_KEY,
    MASKED_INPUT,
    MASKED_KEY,
    REPORT_KEY,
    SHARE_KEYS,
    UNMASK,
    UNMASK_KEY,
    RoundTag,
    message_type,
)
from sepal import wire
from server.secure_aggregation import SecureFederation
from sepal.validation_config import ValidationConfig
from server.validation import UpdateValidator
from tests.test_secure_aggregation import SHAPES, Federation5


def server_sends(fed: Federation5, stage: str, change, nodes=None) -> None:
    """The server alters its ``stage`` message to ``nodes`` (all when None) with ``change``."""
    def hook(message: Message) -> Message:
        if message.metadata.message_type == message_type(stage) and \
                (nodes is None or message.metadata.dst_node_id in nodes):
            change(message)
        return message
    fed.grid.on_instruction = hook


def client_sends(fed: Federation5, stage: str, node: int, change) -> None:
    """Client ``node`` replaces its ``stage`` reply's content as ``change`` does."""
    def hook(reply: Message) -> Message:
        if reply.metadata.message_type == message_type(stage) and \
                reply.metadata.src_node_id == node and not reply.has_error():
            change(reply)
        return reply
    fed.grid.on_reply = hook


def replace_neighbour(keys: ConfigRecord, node: int, **fields) -> None:
    position = list(keys["nodes"]).index(node)
    for field, value in fields.items():
        values = list(keys[field])
        values[position] = value
        keys[field] = values


# -- 1. key substitution ------------------------------------------------------------------

def test_server_substituting_a_neighbours_keys_is_refused_naming_the_node():
    fed = Federation5()
    envelope, mask = KeyPair.generate(), KeyPair.generate()  # the server's own key pairs
    server_sends(fed, SHARE_KEYS, lambda m: replace_neighbour(
        m.content[KEYS_KEY], 202, **{"envelope-keys": envelope.public,
                                      "mask-keys": mask.public}), nodes={101})
    result = fed.run_round()
    assert "round keys of node 202: not signed by 'site-202' for this round" \
        in result.failed[101]
    # the victim sealed nothing for the server and forgot its secrets; the rest aggregate
    assert STATE_KEY not in fed.grid.contexts[101].state
    fed.assert_mean_of(result, [202, 303, 404, 505, 606])


@pytest.mark.parametrize("institution", ["mallory", "site-202"])
def test_server_inserting_a_client_of_its_own_is_refused(institution):
    """The server puts node 250 with its own keys in a neighbourhood, signed with its own
    Ed25519 key under a name the roster lacks, or impersonating a real institution."""
    fed = Federation5()
    envelope, mask, signer = KeyPair.generate(), KeyPair.generate(), new_signing_key()

    def insert(message):
        keys = message.content[KEYS_KEY]
        tag, _ = RoundTag.read(message.content)
        signature = signer.sign(keys_statement(tag.context, 250, institution, envelope.public,
                                               mask.public))
        replace_neighbour(keys, 202, **{"envelope-keys": envelope.public,
                                        "mask-keys": mask.public, "institutions": institution,
                                        "signatures": signature})
        keys["nodes"] = [250 if n == 202 else n for n in keys["nodes"]]  # order kept
    server_sends(fed, SHARE_KEYS, insert, nodes={101})
    result = fed.run_round()
    reason = result.failed[101]
    if institution == "mallory":
        assert "node 250 presents round keys signed as 'mallory', an institution this site's " \
               "roster does not know" in reason
    else:
        assert "round keys of node 250: not signed by 'site-202'" in reason


def test_without_authentication_a_substituted_key_goes_unnoticed():
    """What ``secagg-authenticated = false`` gives up (the threat model says so)."""
    fed = Federation5(**{"secagg-authenticated": False})
    envelope, mask = KeyPair.generate(), KeyPair.generate()
    server_sends(fed, SHARE_KEYS, lambda m: replace_neighbour(
        m.content[KEYS_KEY], 202, **{"envelope-keys": envelope.public,
                                      "mask-keys": mask.public}), nodes={101})
    result = fed.run_round()
    assert 101 not in result.failed  # it sealed a share of its secrets for the server's key


# -- 2. neighbourhood shrinking -----------------------------------------------------------

def test_server_shrinking_a_neighbourhood_or_its_threshold_is_refused():
    fed = Federation5(nodes=tuple(range(1, 11)))

    def shrink(message):
        keys = message.content[KEYS_KEY]
        for field in ("nodes", "envelope-keys", "mask-keys", "institutions", "signatures"):
            keys[field] = list(keys[field])[:2]  # itself and node 2
        keys["threshold"] = 2
    server_sends(fed, SHARE_KEYS, shrink, nodes={1})

    def lower(message):
        message.content[KEYS_KEY]["threshold"] = 2
    result = fed.run_round()
    assert "a neighbourhood of 1 neighbour(s) among the 10 clients of this round; this site " \
           "accepts 7 to 9" in result.failed[1]

    server_sends(fed, SHARE_KEYS, lower, nodes={2})
    result = fed.run_round(server_round=2)
    assert "threshold 2 for a neighbourhood of 10 is below this site's floor 7 (node config " \
           "'secagg-min-threshold' 0.667)" in result.failed[2]
    fed.assert_mean_of(result, [n for n in fed.nodes if n != 2])


# -- 3. split view at unmask --------------------------------------------------------------

def test_split_view_of_the_survivors_is_refused_by_the_consistency_check():
    """The server shows 505 and 606 a survivor set without 101, hoping they reveal 101's
    mask key while 101..404 reveal its seed."""
    fed = Federation5()
    without = [n for n in fed.nodes if n != 101]
    server_sends(fed, CONSISTENCY, lambda m: m.content[CONSISTENCY_KEY].__setitem__(
        "survivors", without), nodes={505, 606})
    shares = capture_unmask_replies(fed)
    result = fed.run_round()
    for node in (505, 606):
        assert "only 2 member(s) of this neighbourhood signed the survivor set this client was " \
               "shown < threshold 4" in result.failed[node]
    assert shares and all(101 not in reply["key-owners"] for reply in shares.values())


def test_split_view_without_authentication_stays_below_the_threshold_on_both_sides():
    """Unauthenticated, the floor t > (k + 1) / 2 alone keeps a split view from giving the
    server t seed shares and t mask-key shares of one client (no colluders)."""
    fed = Federation5(**{"secagg-authenticated": False})
    without = [n for n in fed.nodes if n != 101]
    server_sends(fed, UNMASK, lambda m: m.content[UNMASK_KEY].__setitem__(
        "survivors", without), nodes={404, 505, 606})
    shares = capture_unmask_replies(fed)
    result = fed.run_round()
    seeds = sum(101 in reply["seed-owners"] for reply in shares.values())
    keys = sum(101 in reply["key-owners"] for reply in shares.values())
    assert (seeds, keys) == (3, 3) and result.threshold == 4
    assert "share(s) of node 101's self-mask seed arrived < threshold 4" in result.aborted


def capture_unmask_replies(fed: Federation5) -> dict[int, ConfigRecord]:
    replies: dict[int, ConfigRecord] = {}

    def keep(reply: Message) -> Message:
        if reply.metadata.message_type == message_type(UNMASK) and not reply.has_error():
            replies[reply.metadata.src_node_id] = reply.content[UNMASK_KEY]
        return reply
    fed.grid.on_reply = keep
    return replies


# -- 4. safety floors belong to the site ---------------------------------------------------

def test_floors_come_from_the_site_not_from_the_run():
    with pytest.raises(ConfigError, match="secagg-threshold.*must be a fraction in \\(1/2, 1\\]"):
        SecAggConfig.from_mapping({"secagg-threshold": 0.5})

    # a run asking for a 2-regular graph (a cycle) over 10 sites: every site refuses
    fed = Federation5(nodes=tuple(range(1, 11)), **{"secagg-neighbours": 2})
    result = fed.run_round()
    assert "this site accepts 7 to 9 (node config 'secagg-min-neighbour-factor'" \
        in result.failed[1]
    assert result.mean_update is None and "threshold" in result.aborted

    # a site that asks for more than the run offers refuses; one set at 1/2 is misconfigured
    fed = Federation5(site_config={"secagg-min-threshold": 0.9})
    assert "below this site's floor 6" in fed.run_round().failed[101]
    fed = Federation5(site_config={"secagg-min-threshold": 0.5})
    assert "node config 'secagg-min-threshold' must be a fraction in (1/2, 1]" \
        in fed.run_round().failed[101]

    # a run that turns authentication off cannot talk a provisioned site out of it
    fed = Federation5()
    fed.run_config["secagg-authenticated"] = False
    for context in fed.grid.contexts.values():
        context.run_config["secagg-authenticated"] = False
    fed.config = SecAggConfig.from_mapping(fed.run_config)
    result = fed.run_round()
    assert "takes part only in authenticated rounds" in result.failed[101]


# -- 5. malicious clients -----------------------------------------------------------------

def add_to_upload(fed: Federation5, node: int, values: int = 0, weight: int = 0) -> None:
    """Client ``node`` adds ``values`` to every coordinate of its masked vector and
    ``weight`` to its weight units: masks are additive, so this is what it would get by
    encoding a forged update or weight."""
    fixed = sum_fixed_point(fed)
    bits = fixed.sum_bits

    def forge(reply):
        record = reply.content[MASKED_KEY]
        masked = unpack(record["values"].numpy(), bits, fed.dim).astype(np.uint64)
        masked = (masked + np.uint64(values % (1 << bits))) & np.uint64((1 << bits) - 1)
        record["values"] = type(record["values"])(pack(masked.astype(fixed.dtype), bits))
        scalars = record["scalars"].numpy().copy()
        scalars[1] = np.uint64((int(scalars[1]) + weight) % 2**64)
        record["scalars"] = type(record["scalars"])(scalars)
    client_sends(fed, MASKED_INPUT, node, forge)


def sum_fixed_point(fed: Federation5) -> FixedPoint:
    return FixedPoint.for_clients(fed.config.secagg_clip, fed.config.secagg_value_bits,
                                  len(fed.nodes))


def honest_weight(fed: Federation5) -> int:
    return sum(min(e, fed.config.secagg_max_examples) for e in fed.examples.values())


def test_forged_weight_that_wraps_the_sum_is_refused():
    fed = Federation5()
    add_to_upload(fed, 606, weight=2**64 - honest_weight(fed) + 1)  # summed weight wraps to 1
    result = fed.run_round()
    # summed weight 1: the loss, accuracy and coordinate sums are far out of range
    assert result.mean_update is None
    assert "out of range: a client forged its contribution" in result.aborted


def test_forged_weight_above_every_client_weighing_w_is_refused():
    fed = Federation5()
    add_to_upload(fed, 606, weight=6 * fed.config.secagg_max_examples)
    result = fed.run_round()
    assert "summed weight" in result.aborted and "outside (0, 6 x secagg-max-examples = " \
        "6000]" in result.aborted


def test_oversized_values_are_refused_and_the_global_model_is_kept():
    fed = Federation5()
    levels = sum_fixed_point(fed).levels
    add_to_upload(fed, 606, values=6 * levels)  # six clients' worth in one upload
    decoded, _ = secure_federation_round(fed)
    assert decoded.accepted == []  # no aggregate: the strategy keeps the global model
    reason = decoded.summary["secagg"]["aborted"]
    assert "an unmasked coordinate sum" in reason and "forged its contribution" in reason


def test_values_within_range_but_off_the_validator_bound_are_refused():
    """Within what six honest clients can send, but the mean is longer than the clip
    bound the validator enforces on every update (here the unmasked mean)."""
    validator = UpdateValidator(ValidationConfig(validation_norm_multiple=1.0,
                                                 validation_clip_bound=0.3))
    honest = Federation5()
    decoded, _ = secure_federation_round(honest, validator)
    assert len(decoded.accepted) == 1  # the honest mean's norm is about 0.15

    fed = Federation5()
    add_to_upload(fed, 606, values=sum_fixed_point(fed).levels)  # + c / r on every coordinate
    decoded, _ = secure_federation_round(fed, validator)
    assert decoded.accepted == []
    assert "the unmasked mean update fails validation: update L2 norm" \
        in decoded.summary["secagg"]["aborted"]


def secure_federation_round(fed: Federation5, validator: UpdateValidator | None = None):
    weights = OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())
    strategy = FedAvg(min_available_nodes=6, min_train_nodes=6)
    cfg = RunConfig(min_train_nodes=2, min_available_nodes=6, round_timeout=60)
    federation = SecureFederation(fed.grid, strategy, cfg, ["negative", "positive"], None,
                                  None, train_config={"upload-codec": "dense"},
                                  secagg=fed.config, validator=validator)
    messages = list(strategy.configure_train(
        1, wire.arrays_to_record(weights), ConfigRecord({"server-round": 1}), fed.grid))
    return federation.collect_updates(messages, weights), weights


# -- 6. denial of service -----------------------------------------------------------------

def test_a_wrong_share_is_outvoted_and_its_holder_named():
    fed = Federation5()

    def corrupt(reply):
        record = reply.content[UNMASK_KEY]
        shares = list(record["seed-shares"])
        at = list(record["seed-owners"]).index(101)
        share = shares[at]
        shares[at] = share[:shamir.X_BYTES] + bytes(b ^ 0x5A for b in share[shamir.X_BYTES:])
        record["seed-shares"] = shares
    client_sends(fed, UNMASK, 202, corrupt)
    result = fed.run_round()
    fed.assert_mean_of(result, fed.nodes)
    assert result.bad_shares == {202: "sent a wrong share of node 101's self-mask seed"}


def test_too_many_wrong_shares_abort_without_unmasking():
    fed = Federation5()
    liars = {202, 303, 404}  # 3 of 6 holders, t = 4: no 4 correct shares exist

    def corrupt(reply):
        if reply.metadata.message_type == message_type(UNMASK) and \
                reply.metadata.src_node_id in liars:
            record = reply.content[UNMASK_KEY]
            record["seed-shares"] = [s[:shamir.X_BYTES] + bytes(shamir.Y_BYTES - 1) + b"\x07"
                                     for s in record["seed-shares"]]
        return reply
    fed.grid.on_reply = corrupt
    result = fed.run_round()
    assert result.mean_update is None
    assert "self-mask seed: no 4 of the 6 shares give the committed secret" in result.aborted


def test_an_unproven_accusation_drops_nobody():
    fed = Federation5()
    client_sends(fed, MASKED_INPUT, 606, lambda reply: reply.content[REPORT_KEY].__setitem__(
        "bad-senders", [303]))
    result = fed.run_round()
    fed.assert_mean_of(result, fed.nodes)  # 303 still counts
    assert result.accusations == {303: [606]} and not result.rejected


# -- 7. secrets of an aborted round --------------------------------------------------------

def test_secrets_are_erased_when_a_round_is_abandoned_or_another_round_speaks():
    fed = Federation5()
    gone = {202, 303, 404}

    def lose(reply):
        if reply.metadata.message_type == message_type(MASKED_INPUT) and \
                reply.metadata.src_node_id in gone:
            return None
        return reply
    fed.grid.on_reply = lose
    result = fed.run_round(server_round=1)
    assert "threshold" in result.aborted
    fed.grid.on_reply = None
    # the server never tells the clients; the first message of any other round does
    assert "seed" in fed.grid.contexts[101].state[STATE_KEY]
    other = RoundTag.new(1, 7)
    stray = Message(RecordDict({HEADER_KEY: other.header(UNMASK),
                                UNMASK_KEY: ConfigRecord({"signers": [], "signatures": []})}),
                    101, message_type(UNMASK))
    reply = fed.grid.send_and_receive([stray])[0]
    assert reply.has_error() and "replayed or misrouted" in reply.error.reason
    assert STATE_KEY not in fed.grid.contexts[101].state
    # the others hold theirs until the next round's setup replaces them
    for node in (505, 606):
        assert fed.grid.contexts[node].state[STATE_KEY]["stage"] == MASKED_INPUT
    result = fed.run_round(server_round=2)
    fed.assert_mean_of(result, fed.nodes)
