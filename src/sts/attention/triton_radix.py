"""Exact top-k over many programs: radix select on float32 scores, in Triton.

For each row ``bh`` of a ``[R, C]`` score matrix (one row per sequence and KV head), find the exact
``k``-th largest score when ``C`` is too large for one program to hold (tens of thousands of candidate
rows: budgets of thousands of rows). Scores are stored as int32 *order keys* (the float's bits, the
negatives' magnitude bits flipped, so that integer order is float order; ``INVALID`` marks a
candidate that takes no part), and the threshold is found by radix select (as in CUB's and PyTorch's
``topk``, here spread over chunks of candidates, each chunk one program):

1. a level-1 histogram of each key's top 8 bits (the caller's kernel builds it while writing the
   keys: :func:`add_histogram`), added into a global ``[R, 1024]`` int32 histogram with atomics;
2. :func:`radix_level_kernel` (levels 2, 3 and 4): every program finds from the previous levels'
   histograms the bin that holds the ``k``-th largest key (:func:`pick_bin`), and histograms the
   next 8 bits of the keys inside that bin.
3. :func:`count_kernel`: the threshold ``T`` is then exact; each chunk counts its keys above ``T``
   and equal to ``T``, so that a later pass can compact the chosen candidates in position order
   (ties at ``T`` taken first by position) without atomics: the output is deterministic.

Digits of 8 bits (four levels), not 11 (three): ``tl.histogram`` costs about its bin count per key (a
ballot per bit, then each thread's share of the bins counted), so on an H200 a level of 2048 bins took 19 us
at batch 1 (52156 candidates x 8 KV heads, ``docs/bench/rerank_profile.py``) where one of 256 bins takes 5.

Every launch's grid comes from static shapes and the histograms are zeroed on the device, so the
whole select is safe to capture in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Key of a candidate that takes no part (below every float's key).
INVALID = tl.constexpr(-(2**31))
#: Levels of the select (each resolves one 8-bit digit of the key, most significant first) and bins of one
#: level's histogram.
LEVELS = 4
BINS = 256
#: Bins of a row's histograms, all levels.
HIST_BINS = LEVELS * BINS
#: The same, and the digit's bits, as constants kernels can read.
N_LEVELS = tl.constexpr(LEVELS)
DIGIT_BITS = tl.constexpr(8)
LEVEL_BINS = tl.constexpr(BINS)
HIST = tl.constexpr(HIST_BINS)


@triton.jit
def order_key(x):
    """Return int32 keys that order like the float32 values ``x`` (IEEE bits, negatives' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _unsigned(key):
    """Return ``key`` shifted to ``[0, 2**32)`` as int64: the order key's bits read as an unsigned number."""
    return key.to(tl.int64) + 2**31


@triton.jit
def add_histogram(hist_ptr, key, valid, LEVEL: tl.constexpr, prefix):
    """Add the level-``LEVEL`` digits of the valid ``key`` (for levels past the first, only the keys whose higher
    digits are ``prefix``) into that level's bins of the row's histogram at ``hist_ptr`` (atomics: other chunks
    add too)."""
    u = _unsigned(key)
    shift = 32 - DIGIT_BITS * LEVEL
    if LEVEL > 1:
        valid = valid & ((u >> (shift + DIGIT_BITS)) == prefix)
    h = tl.histogram(((u >> shift) & (LEVEL_BINS - 1)).to(tl.int32), LEVEL_BINS, mask=valid)
    tl.atomic_add(hist_ptr + (LEVEL - 1) * LEVEL_BINS + tl.arange(0, LEVEL_BINS), h, mask=h > 0, sem="relaxed")


@triton.jit
def pick_bin(hist_ptr, k):
    """Return (bin, rank in it): the highest bin of the level histogram at ``hist_ptr`` whose count at or above it
    reaches ``k`` (``k`` clamped to the histogram's total), and the rank ``k`` has among that bin's keys
    (1 = its largest; 0 when ``k`` is 0)."""
    bins = tl.arange(0, LEVEL_BINS)
    h = tl.load(hist_ptr + bins)
    total = tl.sum(h, 0)
    k = tl.minimum(k, total)
    inclusive = tl.cumsum(h, 0)
    at_or_above = total - inclusive + h
    b = tl.max(tl.where(at_or_above >= k, bins, 0), 0)
    above = total - tl.sum(tl.where(bins == b, inclusive, 0), 0)
    return b, k - above


@triton.jit
def bin_prefix(hist_ptr, k, DEPTH: tl.constexpr):
    """Return (prefix, rank): the top ``DEPTH`` digits of the ``k``-th largest key of the row (as an int64), read
    from its first ``DEPTH`` level histograms, and the rank ``k`` has among the keys sharing them."""
    prefix = tl.zeros([], tl.int64)
    for level in tl.static_range(DEPTH):
        b, k = pick_bin(hist_ptr + level * LEVEL_BINS, k)
        prefix = (prefix << DIGIT_BITS) | b.to(tl.int64)
    return prefix, k


@triton.jit
def threshold(hist_ptr, k):
    """Return (T, need): the ``k``-th largest valid key of the row as an unsigned int64 (``2**32 - 1`` when ``k``
    is 0: above every key) and how many keys equal to ``T`` the top ``k`` holds, from all the levels."""
    t, need = bin_prefix(hist_ptr, k, N_LEVELS)
    return tl.where(k > 0, t, 2**32 - 1), need


@triton.jit
def row_k(k_ptr, bh, n_kv_heads, k, PER_SEQUENCE: tl.constexpr):
    """Return row ``bh``'s ``k``: the shared ``k``, or (``PER_SEQUENCE``) its sequence's ``k_ptr[b] + k``."""
    if PER_SEQUENCE:
        return tl.load(k_ptr + bh // n_kv_heads).to(tl.int32) + k
    return k


@triton.jit
def radix_level_kernel(
    key_ptr, hist_ptr, k_ptr, n_kv_heads, n_cand, k,
    LEVEL: tl.constexpr, CHUNK: tl.constexpr, PER_SEQUENCE: tl.constexpr,
):  # fmt: skip
    """Level 2, 3 or 4 of the select: histogram the next digit of the keys inside the bin the levels above chose.
    Grid: (row, chunk of ``CHUNK`` candidates); ``k``, ``k_ptr``: as :func:`row_k`."""
    bh = tl.program_id(0)
    c = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(key_ptr + bh.to(tl.int64) * n_cand + c, mask=c < n_cand, other=INVALID)
    hist = hist_ptr + bh * HIST
    prefix, _ = bin_prefix(hist, row_k(k_ptr, bh, n_kv_heads, k, PER_SEQUENCE), LEVEL - 1)
    add_histogram(hist, key, key != INVALID, LEVEL, prefix)


@triton.jit
def chunk_choice(key_ptr, hist_ptr, bh, chunk, n_cand, k, CHUNK: tl.constexpr):
    """Return the chunk's candidates, their mask of keys above the threshold, of keys at it, and ``need``."""
    c = chunk * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(key_ptr + bh.to(tl.int64) * n_cand + c, mask=c < n_cand, other=INVALID)
    t, need = threshold(hist_ptr + bh * HIST, k)
    valid = key != INVALID
    u = _unsigned(key)
    return c, valid & (u > t), valid & (u == t), need


@triton.jit
def count_kernel(
    key_ptr, hist_ptr, k_ptr, count_ptr, n_kv_heads, n_cand, n_chunks, k,
    CHUNK: tl.constexpr, PER_SEQUENCE: tl.constexpr,
):  # fmt: skip
    """Write each chunk's count of keys above the threshold and at it: ``count[row, chunk, 0:2]``."""
    bh = tl.program_id(0)
    chunk = tl.program_id(1)
    _, above, tie, _ = chunk_choice(key_ptr, hist_ptr, bh, chunk, n_cand,
                                    row_k(k_ptr, bh, n_kv_heads, k, PER_SEQUENCE), CHUNK)
    out = count_ptr + (bh * n_chunks + chunk) * 2
    tl.store(out, tl.sum(above.to(tl.int32), 0))
    tl.store(out + 1, tl.sum(tie.to(tl.int32), 0))


@triton.jit
def chunk_take(key_ptr, hist_ptr, count_ptr, bh, chunk, n_cand, n_chunks, k,
               CHUNK: tl.constexpr, BLOCK_CHUNKS: tl.constexpr):  # fmt: skip
    """Return the chunk's candidates, the mask of those in the row's top ``k`` (ties at the threshold first by
    position), how many of the top ``k`` earlier chunks hold, and how many the row holds in all."""
    c, above, tie, need = chunk_choice(key_ptr, hist_ptr, bh, chunk, n_cand, k, CHUNK)
    chunks = tl.arange(0, BLOCK_CHUNKS)
    ok = chunks < n_chunks
    n_above = tl.load(count_ptr + (bh * n_chunks + chunks) * 2, mask=ok, other=0)
    n_tie = tl.load(count_ptr + (bh * n_chunks + chunks) * 2 + 1, mask=ok, other=0)
    ties_before = tl.cumsum(n_tie, 0) - n_tie
    taken = n_above + tl.minimum(tl.maximum(need - ties_before, 0), n_tie)
    before = tl.sum(tl.where(chunks < chunk, taken, 0), 0)
    my_ties_before = tl.sum(tl.where(chunks == chunk, ties_before, 0), 0)
    take = above | (tie & (my_ties_before + tl.cumsum(tie.to(tl.int32), 0) <= need))
    return c, take, before, tl.sum(taken, 0)
