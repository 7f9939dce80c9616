"""Property tests: TileBuilder, MemoryTree and tile-backed proofs against the naive RFC 9162
reference (tests/reference_merkle.py), and every proof through the verifier, tampered or not.

Set MERKLE_THOROUGH=1 for many more hypothesis examples than the default quick run.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_merkle as ref
from listener.merkle import (
    MemoryTree,
    ProofError,
    TileBuilder,
    TileReader,
    consistency_proof,
    inclusion_proof,
    root_at,
    verify_consistency,
    verify_inclusion,
)

THOROUGH = os.environ.get("MERKLE_THOROUGH") == "1"
QUICK = settings(
    max_examples=400 if THOROUGH else 50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LARGE = settings(QUICK, max_examples=20 if THOROUGH else 2)


def entries(begin: int, end: int) -> list[bytes]:
    return [b"row %d" % i for i in range(begin, end)]


def leaf_hashes(data: list[bytes]) -> list[bytes]:
    return [hashlib.sha256(b"\x00" + d).digest() for d in data]


def flip(h: bytes, bit: int) -> bytes:
    return h[: bit // 8] + bytes([h[bit // 8] ^ (1 << (bit % 8))]) + h[bit // 8 + 1 :]


def tampered_proofs(proof: list[bytes], rng: random.Random) -> list[list[bytes]]:
    """Proofs that must not verify: one hash modified, one removed, one added, two swapped."""
    out = [proof + [proof[-1] if proof else bytes(32)]]
    if proof:
        i = rng.randrange(len(proof))
        out.append(proof[:i] + [flip(proof[i], rng.randrange(256))] + proof[i + 1 :])
        out.append(proof[:i] + proof[i + 1 :])
    if len(proof) >= 2:
        out.append([proof[1], proof[0]] + proof[2:])
    return out


def check_inclusion(readers, data, hashes, index, size, root, rng):
    want = ref.path(index, data[:size])
    for reader in readers:
        assert inclusion_proof(reader, index, size) == want
    verify_inclusion(hashes[index], index, size, want, root)
    for bad in tampered_proofs(want, rng):
        with pytest.raises(ProofError):
            verify_inclusion(hashes[index], index, size, bad, root)
    with pytest.raises(ProofError):
        verify_inclusion(flip(hashes[index], 0), index, size, want, root)
    with pytest.raises(ProofError):
        verify_inclusion(hashes[index], index, size, want, flip(root, 255))
    if index + 1 < size:
        with pytest.raises(ProofError):
            verify_inclusion(hashes[index], index + 1, size, want, root)


def check_consistency(readers, data, first, second, roots, rng):
    want = ref.proof(first, data[:second]) if 0 < first < second else []
    for reader in readers:
        assert consistency_proof(reader, first, second) == want
    verify_consistency(first, second, want, roots[first], roots[second])
    for bad in tampered_proofs(want, rng):
        with pytest.raises(ProofError):
            verify_consistency(first, second, bad, roots[first], roots[second])
    with pytest.raises(ProofError):
        verify_consistency(first, second, want, flip(roots[first], 7), roots[second])
    if first:  # every tree extends the empty one, whatever its root
        with pytest.raises(ProofError):
            verify_consistency(first, second, want, roots[first], flip(roots[second], 7))


def build(batches: list[int], reference_every_batch: bool = True):
    """Append batches through TileBuilder, keeping the latest version of every emitted tile.

    The root after each batch is checked against the reference (or, for large trees, against
    MemoryTree, with the reference checked once at the end to keep the run short).
    """
    data = entries(0, sum(batches))
    hashes = leaf_hashes(data)
    builder, tiles, tree = TileBuilder(), TileReader(), MemoryTree()
    size = 0
    for batch in batches:
        tiles.store(builder.append(hashes[size : size + batch]))
        tree.append(hashes[size : size + batch])
        size += batch
        assert builder.size == size
        assert builder.root == (ref.mth(data[:size]) if reference_every_batch else tree.root())
    assert builder.root == ref.mth(data)
    return data, hashes, builder, tiles, tree


def test_every_size_up_to_1000():
    n = 1000
    data = entries(0, n)
    hashes = leaf_hashes(data)
    builder, tiles = TileBuilder(), TileReader()
    roots = [ref.mth([])]
    for size in range(1, n + 1):
        tiles.store(builder.append(hashes[size - 1 : size]))
        roots.append(ref.mth(data[:size]))
        assert builder.root == roots[size]
    tree = MemoryTree(hashes)
    rng = random.Random(1000)
    for size in range(n + 1):
        assert root_at(tree, size) == root_at(tiles, size) == roots[size]
        if size:
            check_inclusion([tree, tiles], data, hashes, rng.randrange(size), size, roots[size], rng)
        check_consistency([tree, tiles], data, rng.randint(0, size), size, roots, rng)


def test_all_pairs_up_to_64():
    data = entries(0, 64)
    hashes = leaf_hashes(data)
    tree = MemoryTree(hashes)
    roots = [ref.mth(data[:size]) for size in range(65)]
    rng = random.Random(64)
    for size in range(65):
        for i in range(size):
            check_inclusion([tree], data, hashes, i, size, roots[size], rng)
        for first in range(size + 1):
            check_consistency([tree], data, first, size, roots, rng)


@QUICK
@given(batches=st.lists(st.integers(0, 700), min_size=1, max_size=5), data=st.data())
def test_random_batches(batches, data):
    entries_, hashes, builder, tiles, tree = build(batches)
    size = builder.size
    roots = {0: ref.mth([]), size: builder.root}
    rng = random.Random(size)
    for _ in range(6):
        if size:
            n = data.draw(st.integers(1, size), label="size")
            roots.setdefault(n, ref.mth(entries_[:n]))
            assert root_at(tiles, n) == root_at(tree, n) == roots[n]
            i = data.draw(st.integers(0, n - 1), label="index")
            check_inclusion([tree, tiles], entries_, hashes, i, n, roots[n], rng)
        m = data.draw(st.integers(0, size), label="first")
        roots.setdefault(m, ref.mth(entries_[:m]))
        check_consistency([tree, tiles], entries_, m, size, roots, rng)


@QUICK
@given(
    before=st.lists(st.integers(0, 600), min_size=1, max_size=4),
    after=st.lists(st.integers(0, 600), min_size=1, max_size=4),
)
def test_restored_builder_continues_identically(before, after):
    size = sum(before)
    hashes = leaf_hashes(entries(0, size + sum(after)))
    original = TileBuilder()
    for batch, start in zip(before, _starts(before, 0)):
        original.append(hashes[start : start + batch])
    restored = TileBuilder(size, original.partial_tiles())
    assert restored.root == original.root
    for batch, start in zip(after, _starts(after, size)):
        chunk = hashes[start : start + batch]
        assert restored.append(chunk) == original.append(chunk)
        assert restored.root == original.root
        assert restored.partial_tiles() == original.partial_tiles()


def _starts(batches: list[int], offset: int) -> list[int]:
    starts = []
    for batch in batches:
        starts.append(offset)
        offset += batch
    return starts


@LARGE
@given(size=st.integers(65_537, 100_000), seed=st.integers(0, 2**32))
def test_large_trees(size, seed):
    rng = random.Random(seed)
    batches = []
    while sum(batches) < size:
        batches.append(min(rng.choice([1, 7, 255, 256, 257, 4000, 30_000]), size - sum(batches)))
    data, hashes, builder, tiles, tree = build(batches, reference_every_batch=False)
    assert [t.level for t in builder.partial_tiles()][-1] == 2
    for _ in range(3):
        n = rng.randint(1, size)
        root = ref.mth(data[:n])
        assert root_at(tiles, n) == root
        check_inclusion([tree, tiles], data, hashes, rng.randrange(n), n, root, rng)
    first = rng.randint(1, size)
    check_consistency([tree, tiles], data, first, size, {first: ref.mth(data[:first]), size: builder.root}, rng)
