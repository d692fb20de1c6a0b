"""The building blocks of secure aggregation, with real cryptography."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from sepal.config import ConfigError
from sepal.secagg import envelope, graph, shamir
from sepal.secagg.config import SecAggConfig
from sepal.secagg.errors import SecAggError
from sepal.secagg.fixedpoint import FixedPoint, decode_scalars, encode_scalars, sum_bits
from sepal.secagg.keys import KeyPair, agree, derive, public_key_of
from sepal.secagg.masks import MaskExpander, VectorMasks, word_dtype
from sepal.secagg.packing import pack, packed_size, unpack


def test_shamir_any_threshold_subset_reconstructs_and_fewer_cannot():
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, count=5)
    assert len(shares) == 5 and all(len(s) == shamir.SHARE_BYTES for s in shares)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), 3) == secret
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.combine(shares[:2], 3)


def test_shamir_tampered_share_changes_the_secret_and_bad_inputs_are_named():
    secret = os.urandom(32)
    shares = shamir.split(secret, 2, 3)
    tampered = shares[0][:-1] + bytes([shares[0][-1] ^ 1])
    try:
        assert shamir.combine([tampered, shares[1]], 2) != secret
    except SecAggError as err:  # or it falls outside 32 bytes
        assert "inconsistent" in str(err)
    with pytest.raises(SecAggError, match="same index"):
        shamir.combine([shares[0], shares[0]], 2)
    with pytest.raises(SecAggError, match="32 bytes"):
        shamir.split(b"short", 2, 3)
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(secret, 4, 3)


@pytest.mark.parametrize("wrong", [(), (1,), (1, 6), (2, 4, 7)])
def test_robust_combine_outvotes_wrong_shares_and_names_their_holders(wrong):
    secret = os.urandom(32)
    shares = dict(zip(range(1, 10), shamir.split(secret, 5, 9)))  # t = 5 of 9
    for holder in wrong:
        share = shares[holder]
        shares[holder] = share[:shamir.X_BYTES] + os.urandom(shamir.Y_BYTES - 1) + b"\x01"
    rebuilt, bad = shamir.robust_combine(shares, 5, lambda candidate: candidate == secret)
    assert rebuilt == secret and bad == sorted(wrong)


def test_robust_combine_gives_up_when_fewer_than_t_shares_are_right():
    secret = os.urandom(32)
    shares = dict(zip(range(1, 7), shamir.split(secret, 4, 6)))
    for holder in (1, 2, 3):
        shares[holder] = shares[holder][:shamir.X_BYTES] + bytes(shamir.Y_BYTES)
    with pytest.raises(SecAggError, match="no 4 of the 6 shares give the committed secret"):
        shamir.robust_combine(shares, 4, lambda candidate: candidate == secret)
    with pytest.raises(SecAggError, match="no 4 of the 6 shares checked out in 3 tries"):
        shamir.robust_combine(shares, 4, lambda candidate: candidate == secret, max_subsets=3)


def test_x25519_hkdf_agreement_is_symmetric_and_bound_to_purpose_and_round():
    a, b, c = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    ab = agree(a.private, b.public, b"pairwise-mask", b"round-1")
    assert ab == agree(b.private, a.public, b"pairwise-mask", b"round-1")
    assert len(ab) == 32
    assert ab != agree(a.private, b.public, b"share-envelope", b"round-1")
    assert ab != agree(a.private, b.public, b"pairwise-mask", b"round-2")
    assert ab != agree(a.private, c.public, b"pairwise-mask", b"round-1")
    assert public_key_of(a.private) == a.public
    with pytest.raises(SecAggError, match="agreement failed"):
        agree(a.private, bytes(32), b"pairwise-mask", b"round-1")  # small-order point
    assert derive(b"s" * 32, b"self-mask", b"r1") != derive(b"s" * 32, b"self-mask", b"r2")


def test_envelope_detects_tampering_replay_and_misrouting():
    key = os.urandom(32)
    bound = envelope.associated_data(b"round-A", "share-keys", 3, 7)
    sealed = envelope.seal(key, b"two shares", bound)
    assert envelope.open_envelope(key, sealed, bound) == b"two shares"
    flipped = sealed[:20] + bytes([sealed[20] ^ 0x01]) + sealed[21:]
    for blob, associated in [
        (flipped, bound),
        (sealed, envelope.associated_data(b"round-B", "share-keys", 3, 7)),  # other round
        (sealed, envelope.associated_data(b"round-A", "unmask", 3, 7)),      # other stage
        (sealed, envelope.associated_data(b"round-A", "share-keys", 3, 8)),  # other recipient
        (sealed[:10], bound),
    ]:
        with pytest.raises(SecAggError, match="authentication|truncated"):
            envelope.open_envelope(key, blob, associated)


def test_masks_are_deterministic_per_key_distinct_across_keys_and_cancel():
    expander = MaskExpander(1000, word_dtype(20))
    key_1, key_2 = os.urandom(32), os.urandom(32)
    first = expander.mask(key_1).copy()
    assert np.array_equal(first, expander.mask(key_1))
    assert not np.array_equal(first, expander.mask(key_2))
    masks = VectorMasks(1000, 20, 5)
    values = np.arange(1000, dtype=np.uint32)
    scalars = np.arange(5, dtype=np.uint64)
    masks.add(values, scalars, key_1, +1)
    assert not np.array_equal(values, np.arange(1000))
    masks.add(values, scalars, key_1, -1)
    assert np.array_equal(values, np.arange(1000)) and np.array_equal(scalars, np.arange(5))
    assert word_dtype(32) == np.uint32 and word_dtype(33) == np.uint64


@pytest.mark.parametrize("bits", [1, 5, 8, 13, 19, 24, 32, 33, 50, 62])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_packing_roundtrips_at_exactly_b_bits_per_value(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 2**bits, count, dtype=np.uint64).astype(word_dtype(bits))
    packed = pack(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits)
    assert packed.size == -(-count // 8) * bits  # <= b bytes of padding in all
    assert np.array_equal(unpack(packed, bits, count), values)
    with pytest.raises(ValueError, match="packed vector must be"):
        unpack(packed[:-1], bits, count)


def test_fixed_point_sum_is_exact_within_rounding_and_never_wraps():
    clients, rng = 7, np.random.default_rng(1)
    fixed = FixedPoint.for_clients(clip=0.1, value_bits=12, clients=clients)
    assert fixed.sum_bits == sum_bits(12, clients) == (2 * clients * fixed.levels).bit_length()
    assert 2 * clients * fixed.levels + 1 <= 2**fixed.sum_bits
    assert 2 * clients * fixed.levels + 1 > 2 ** (fixed.sum_bits - 1)  # b is minimal

    updates = [rng.normal(0, 0.03, 5000).astype(np.float32) for _ in range(clients)]
    weights = [0.2, 0.5, 1.0, 1.0, 0.7, 0.05, 0.9]
    total = np.zeros(5000, dtype=fixed.dtype)
    for update, weight in zip(updates, weights):
        words, clipped = fixed.encode(update, weight, rng)
        assert clipped == np.count_nonzero(np.abs(update) > 0.1)
        total += words
    expected = sum(w * np.clip(u, -0.1, 0.1) for u, w in zip(updates, weights))
    error = fixed.decode_sum(total) - expected
    assert np.abs(error).max() < clients * fixed.step  # each client rounds by < 1 step
    assert abs(error.mean()) < 0.1 * fixed.step        # stochastic rounding is unbiased

    for extreme in (0.1, -0.1, 5.0, -5.0):  # every client at (or clipped to) the edge
        total = np.zeros(3, dtype=fixed.dtype)
        for _ in range(clients):
            words, clipped = fixed.encode(np.full(3, extreme, np.float32), 1.0, rng)
            assert clipped == (3 if abs(extreme) > 0.1 else 0)
            total += words
        assert np.allclose(fixed.decode_sum(total), np.sign(extreme) * clients * 0.1)


def test_scalars_sum_examples_weights_and_weighted_metrics():
    # weight units min(examples, W = 1000): 100 and 1000
    total = (encode_scalars(100, 100, 0.5, 0.8, 3) + encode_scalars(3000, 1000, 0.3, 0.6, 0))
    totals = decode_scalars(total)
    assert totals["examples"] == 3100 and totals["weight-units"] == 1100
    assert totals["clipped"] == 3
    assert totals["train-loss"] == pytest.approx((100 * 0.5 + 1000 * 0.3) / 1100, abs=1e-6)
    assert totals["train-accuracy"] == pytest.approx((100 * 0.8 + 1000 * 0.6) / 1100, abs=1e-6)


def test_neighbour_graph_is_complete_when_small_and_k_regular_when_large():
    assert graph.neighbour_count(10) == 9
    hood = graph.build_graph(list(range(10, 20)), graph.neighbour_count(10))
    assert all(len(neighbours) == 9 for neighbours in hood.values())

    k = graph.neighbour_count(200)
    assert k == 3 * 8 and k < 199
    hood = graph.build_graph(list(range(1000, 1200)), k)
    assert all(len(neighbours) == k and node not in neighbours
               for node, neighbours in hood.items())
    assert all(node in hood[other] for node, neighbours in hood.items() for other in neighbours)
    assert graph.neighbour_count(9, requested=3) == 4  # 9 * 3 is odd: no 3-regular graph

    assert graph.threshold_for(5, 0.6) == 3
    assert graph.threshold_for(2, 0.1) == 2
    assert graph.threshold_for(4, 1.0) == 4


def test_config_section_names_the_bad_key():
    assert SecAggConfig.from_mapping({"secure-aggregation": True}).enabled
    for key, value in [("secagg-clip", 0.0), ("secagg-value-bits", 25),
                       ("secagg-threshold", 1.5), ("secagg-max-examples", 0)]:
        with pytest.raises(ConfigError, match=key):
            SecAggConfig.from_mapping({key: value})


@pytest.mark.parametrize("value_bits, clients", [(17, 2**15), (24, 2**10), (2, 3)])  # b = 32, 34, 3
def test_fixed_point_decodes_signed_sums_at_32_and_64_bit_words(value_bits, clients):
    fixed = FixedPoint.for_clients(clip=1.0, value_bits=value_bits, clients=clients)
    assert fixed.dtype == (np.uint32 if fixed.sum_bits <= 32 else np.uint64)
    rng = np.random.default_rng(3)
    values = np.array([1.0, -1.0, 0.0, 0.5, -0.25], np.float32)
    total = np.zeros(5, dtype=fixed.dtype)
    for _ in range(3):
        words, _ = fixed.encode([values[:2], values[2:]], 1.0, rng)  # tensors back to back
        total += words
    assert np.abs(fixed.decode_sum(total) - 3 * values).max() <= 3 * fixed.step + 1e-6
