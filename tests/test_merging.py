"""BTR's offline merging (paper Algorithm 1) at scale: the grouped, packed-bit implementation must give the very
codebook the original per-token scan gave. The original is kept here, verbatim in behaviour, as the oracle."""
import time

import numpy as np
import pytest

from ragdemo.engine import merging
from ragdemo.engine.merging import merge_by_token, nearest_hamming


# ------------------------------------------------------------------ the oracle: the implementation before issue 13

def _oracle_hamming(a, b):
    xor = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(xor, axis=-1).sum(axis=-1, dtype=np.int32)


def _oracle_majority(codes, d_bits):
    ones = np.unpackbits(codes, axis=-1, count=d_bits).astype(np.int32).sum(axis=0)
    first = np.unpackbits(codes[:1], axis=-1, count=d_bits)[0]
    vote = np.where(2 * ones == len(codes), first, (2 * ones > len(codes)).astype(np.uint8))
    return np.packbits(vote)


def _oracle_merge_by_token(token_ids, codes, scales, ratio, stopword_ids, d_bits):
    parent = np.arange(len(token_ids))
    for token in np.unique(token_ids):
        members = np.flatnonzero(token_ids == token)
        if len(members) < 2:
            continue
        if int(token) in stopword_ids:
            parent[members] = members[0]
            continue
        n_remove = min(int(ratio * len(members)), len(members) // 2)
        if n_remove <= 0:
            continue
        a, b = members[0::2], members[1::2]
        dist = _oracle_hamming(codes[a], codes[b])
        nearest = dist.argmin(axis=1)
        best = np.argsort(dist[np.arange(len(a)), nearest], kind="stable")[:n_remove]
        parent[a[best]] = b[nearest[best]]
    roots, index = np.unique(parent, return_inverse=True)
    merged_codes = np.empty((len(roots), codes.shape[1]), np.uint8)
    merged_scales = np.empty((len(roots),) + scales.shape[1:], np.float16)
    for slot, root in enumerate(roots):
        group = np.flatnonzero(parent == root)
        order = np.concatenate([[root], group[group != root]])
        merged_codes[slot] = _oracle_majority(codes[order], d_bits) if len(group) > 1 else codes[root]
        merged_scales[slot] = scales[group].astype(np.float32).mean(axis=0)
    return merged_codes, merged_scales, index


# ------------------------------------------------------------------ cases

def _case(seed: int, n: int, vocab: int, d_bits: int):
    rng = np.random.default_rng(seed)
    tokens = np.minimum(rng.zipf(1.3, n), vocab).astype(np.int64)  # a few very frequent tokens, a long tail
    codes = np.packbits(rng.random((n, d_bits)) < 0.5, axis=-1)
    scales = (rng.random(n) * 2 + 0.01).astype(np.float16)
    stopwords = {1, 3}  # two of the most frequent tokens
    return tokens, codes, scales, stopwords


def _assert_same(tokens, codes, scales, ratio, stopwords, d_bits):
    book = merge_by_token(tokens, codes, scales, ratio, stopwords, d_bits)
    want_codes, want_scales, want_index = _oracle_merge_by_token(tokens, codes, scales, ratio, stopwords, d_bits)
    assert np.array_equal(book.index, want_index)
    assert np.array_equal(book.codes, want_codes)
    assert book.scales.dtype == np.float16 and np.array_equal(book.scales.view(np.uint16), want_scales.view(np.uint16))
    return book


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("d_bits", [16, 20, 576])
def test_codebook_identical_to_the_original(ratio, d_bits):
    tokens, codes, scales, stopwords = _case(int(ratio * 10) + d_bits, 3000, 400, d_bits)
    book = _assert_same(tokens, codes, scales, ratio, stopwords, d_bits)
    if ratio >= 0.5:
        assert len(book.codes) < len(tokens) * 0.8  # something was actually merged


def test_ties_go_the_same_way():
    """3-bit codes: most distances tie, so argmin order, stable sorting and majority ties all matter."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, 6, 500)
    codes = np.packbits(rng.random((500, 3)) < 0.5, axis=-1)
    scales = rng.random(500).astype(np.float16)
    _assert_same(tokens, codes, scales, 0.5, set(), 3)


def test_identical_when_every_step_is_cut_into_small_blocks(monkeypatch):
    """Bounded memory: distance blocks of a few rows and a frequent token's bits summed in slices."""
    monkeypatch.setattr(merging, "BLOCK_BYTES", 4096)
    tokens, codes, scales, stopwords = _case(11, 4000, 300, 64)
    _assert_same(tokens, codes, scales, 0.5, stopwords, 64)


def test_nearest_hamming_on_packed_words():
    rng = np.random.default_rng(5)
    a, b = (np.packbits(rng.random((n, 128)) < 0.5, axis=-1) for n in (40, 70))
    nearest, distance = nearest_hamming(a.view(np.uint64), b.view(np.uint64))
    brute = _oracle_hamming(a, b)
    assert np.array_equal(nearest, brute.argmin(axis=1))
    assert np.array_equal(distance, brute.min(axis=1))


def _zipf_collection(n: int, d_bits: int = 576, seed: int = 0):
    """Tokens drawn like text (Zipf over a 49k vocabulary), random packed codes; the 150 most frequent token
    ids stand in for the stopwords and punctuation that `stopword_ids` finds in real text."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, 49_153)
    p = 1.0 / ranks
    tokens = rng.choice(len(ranks), size=n, p=p / p.sum())
    codes = rng.integers(0, 256, (n, d_bits // 8), dtype=np.uint8)  # random packed bits
    scales = rng.random(n, dtype=np.float32).astype(np.float16)
    return tokens, codes, scales, set(range(150))


@pytest.mark.slow
def test_a_million_tokens_in_under_two_minutes():
    tokens, codes, scales, stopwords = _zipf_collection(1_000_000)
    start = time.perf_counter()
    book = merge_by_token(tokens, codes, scales, 0.5, stopwords, 576)
    seconds = time.perf_counter() - start
    print(f"1M tokens, r_o=0.5: {seconds:.1f} s, {len(book.codes)} codes")
    assert seconds < 120 and len(book.codes) < len(tokens)
