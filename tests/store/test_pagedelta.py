"""`pagedelta`: changed pages only, as slices over older chunks; the compaction rule; damage; the manifest
shape readers check. (A real CRIU job: test_runner.py::test_random_page_changes_are_stored_as_page_deltas_...)"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import random

import blake3
import pytest

from ckpt_agent.errors import DamagedCheckpointError
from ckpt_agent.store import chunks as chunkstore
from ckpt_agent.store import pagedelta
from ckpt_agent.store.chunks import ChunkStore, restore_file, store_file
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.store.manifest import FORMAT_VERSION, SLICE_BYTES, ImageEntry, Manifest, check

PAGE = pagedelta.PAGE
NPAGES = 2048  # 8 MiB
RUNS = [(0x7f0000000000, 1024), (0x7f1000000000, 1024)]  # two mappings, far apart


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(4) as p:
        yield p


def write_pages(path, data):
    path.write_bytes(bytes(data))
    return str(path)


def full_entry(chunks, pool, path):
    refs, _, size = store_file(chunks, path, pool)
    table, _ = pagedelta.store_table(chunks, *pagedelta.hash_file(path, RUNS), pool)
    return ImageEntry(name="pages-1.img", size=size, chunks=refs, pagetable=table)


def changed(data, share, seed):
    rng = random.Random(seed)
    out = bytearray(data)
    for p in rng.sample(range(NPAGES), int(NPAGES * share)):
        out[p * PAGE:(p + 1) * PAGE] = rng.randbytes(PAGE)
    return out


def restored(chunks, entry, dest, pool):
    restore_file(chunks, entry.chunks, str(dest), pool, slices=entry.slices)
    return dest.read_bytes()


def test_a_chain_of_deltas_stores_changed_pages_and_restores_exactly(tmp_path, pool):
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    entry = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    for gen in range(1, 4):
        data = changed(data, 0.05, gen)
        path = write_pages(tmp_path / f"p{gen}", data)
        entry, stats = pagedelta.store_delta(chunks, pool, path, RUNS, entry, "image pages-1.img")
        assert entry is not None and (entry.name, entry.size) == ("pages-1.img", len(data))
        assert entry.delta_depth == gen
        # the changed pages plus the page table (24 bytes a page) and the slice table (12 bytes a slice), nothing
        # of the unchanged 95%
        assert entry.slice_table.count == len(entry.slices)
        assert stats.bytes_written <= 0.05 * len(data) + 24 * NPAGES + SLICE_BYTES * len(entry.slices) + PAGE, stats
        as_stored = entry.to_json()
        assert "slices" not in as_stored and as_stored["slicetable"]["count"] == len(entry.slices)
        check({"created": "x", "images": [as_stored], "files": []}, "test")
        assert restored(chunks, entry, tmp_path / f"r{gen}", pool) == bytes(data)
        # read back as a manifest holds it: the slices come from their chunks, checked, before any use
        reread = ImageEntry.from_json(as_stored)
        with pytest.raises(RuntimeError, match="not read yet"):
            reread.pieces()
        pagedelta.load_slices(chunks, [reread])
        assert reread.slices == entry.slices
        entry = reread


def test_compaction_rule_writes_a_full_image(tmp_path, pool):
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    entry = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    many = write_pages(tmp_path / "p1", changed(data, 0.6, 2))
    assert pagedelta.store_delta(chunks, pool, many, RUNS, entry, "x")[0] is None  # most pages changed
    few = write_pages(tmp_path / "p2", changed(data, 0.01, 3))
    deep = dataclasses.replace(entry, delta_depth=pagedelta.MAX_DELTA_DEPTH)
    assert pagedelta.store_delta(chunks, pool, few, RUNS, deep, "x")[0] is None  # chain long enough
    other_hash = dataclasses.replace(entry, pagetable=dataclasses.replace(entry.pagetable, hash="something-else"))
    assert pagedelta.store_delta(chunks, pool, few, RUNS, other_hash, "x")[0] is None
    assert pagedelta.store_delta(chunks, pool, few, RUNS, entry, "x")[0] is not None


def test_a_rotten_base_chunk_is_not_referenced_when_verified_and_damages_a_delta_that_uses_it(tmp_path, pool):
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    entry = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    path = write_pages(tmp_path / "p1", changed(data, 0.05, 2))
    delta, _ = pagedelta.store_delta(chunks, pool, path, RUNS, entry, "x")
    victim = entry.chunks[3]
    rotten = chunks.path(victim)
    with open(rotten, "r+b") as fh:
        fh.write(b"garbage")
    with pytest.raises(DamagedCheckpointError, match="fails its checksum"):
        restored(chunks, delta, tmp_path / "r", pool)
    # a checkpoint that verifies reused chunks writes the image in full instead of slicing a rotten chunk
    assert pagedelta.store_delta(chunks, pool, path, RUNS, entry, "x", verify=lambda _d: True)[0] is None


def test_page_table_chunks_are_referenced_and_bad_slices_are_a_damaged_manifest(tmp_path, pool):
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    entry = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    manifest = Manifest(format=FORMAT_VERSION, created="x", images=[entry], files=[])
    check(manifest.to_json(), "t")
    assert entry.pagetable.chunks and {r.digest for r in entry.pagetable.chunks} <= {r.digest for r in manifest.refs()}
    for slices in ([[0, 0, PAGE * 300]], [[99, 0, PAGE]], [[0, -1, PAGE]], "no"):
        bad = {**entry.to_json(), "slices": slices}
        with pytest.raises(DamagedCheckpointError, match="bad slices|disagree"):
            check({"created": "x", "images": [bad], "files": []}, "t")


def test_a_deltas_manifest_entry_does_not_grow_with_its_slices(tmp_path, pool):
    """Format 3: the slices are in chunks; the entry lists chunks only (inline, 40% of the pages changed at random
    make ~1,000 slices here, ~20 bytes of JSON each inline)."""
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    first = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    path = write_pages(tmp_path / "p1", changed(data, 0.4, 2))
    delta, _ = pagedelta.store_delta(chunks, pool, path, RUNS, first, "x")
    refs = len(delta.chunks) + len(delta.pagetable.chunks) + len(delta.slice_table.chunks)
    stored = len(json.dumps(delta.to_json()))
    assert len(delta.slices) > 500 and stored < 100 * refs + 200 < 4 * len(delta.slices), (len(delta.slices), stored)


def test_a_damaged_slice_table_is_a_damaged_image_and_the_next_delta_is_written_in_full(tmp_path, pool):
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    first = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    data = changed(data, 0.05, 2)
    delta, _ = pagedelta.store_delta(chunks, pool, write_pages(tmp_path / "p1", data), RUNS, first, "x")
    with open(chunks.path(delta.slice_table.chunks[0]), "r+b") as fh:
        fh.write(b"garbage")
    reread = ImageEntry.from_json(delta.to_json())
    with pytest.raises(DamagedCheckpointError, match="image pages-1.img slice table.*fails its checksum"):
        pagedelta.load_slices(chunks, [reread])
    nxt = write_pages(tmp_path / "p2", changed(data, 0.05, 3))
    assert pagedelta.store_delta(chunks, pool, nxt, RUNS, ImageEntry.from_json(delta.to_json()), "x")[0] is None


def test_pruning_the_full_generation_keeps_the_chunks_a_kept_delta_slices(tmp_path, pool):
    (tmp_path / "store").mkdir()
    store = CheckpointStore(str(tmp_path / "store"))
    store.ensure_job("7", "main")
    chunks = store.chunks_for("7", "none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    images = []
    for gen in range(2):
        path = write_pages(tmp_path / f"p{gen}", data)
        if not images:
            entry = full_entry(chunks, pool, path)
        else:
            entry, _ = pagedelta.store_delta(chunks, pool, path, RUNS, images[-1], "x")
        images.append(entry)
        number, partial = store.begin("7", "main")
        store.commit(partial, number, Manifest(format=FORMAT_VERSION, created=f"2026-12-01T00:00:0{gen}.000000Z",
                                               images=[entry], files=[]))
        data = changed(data, 0.05, gen + 5)
    assert store.prune("7", "main", 1) == [1]
    store.sweep_chunks("7")
    kept = store.load_manifest(store.latest_generation("7", "main")).images[0]
    assert kept.slice_table is not None and any(c in images[0].chunks for c in kept.chunks)
    pagedelta.load_slices(store.chunks_for("7"), [kept])  # the sweep kept the slice table's chunks too
    rebuilt = restored(store.chunks_for("7"), kept, tmp_path / "r", pool)
    assert rebuilt == (tmp_path / "p1").read_bytes()


def test_without_the_xxhash_wheel_images_are_stored_whole(tmp_path, pool, monkeypatch):
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    entry = full_entry(chunks, pool, write_pages(tmp_path / "p0", data))
    monkeypatch.setattr(pagedelta, "PAGE_HASH", None)
    few = write_pages(tmp_path / "p1", changed(data, 0.01, 3))
    assert pagedelta.store_delta(chunks, pool, few, RUNS, entry, "x")[0] is None


def test_the_page_table_is_packed_entry_by_entry_whatever_the_path(monkeypatch):
    """The strided copy that builds a page table writes exactly the (vaddr, hash) entries struct.pack would, and
    so does the fallback for big-endian machines."""
    import struct
    import sys

    runs = [(0x7F0000000000, 3), (0x7F1000000000, 2)]
    vaddrs = pagedelta.run_vaddrs(runs)
    assert list(vaddrs) == [0x7F0000000000 + k * pagedelta.PAGE for k in range(3)] + [
        0x7F1000000000 + k * pagedelta.PAGE for k in range(2)]
    hashes = [bytes([i]) * 16 for i in range(5)]
    expected = b"".join(struct.pack("<Q16s", v, h) for v, h in zip(vaddrs, hashes))
    assert pagedelta.pack_table(vaddrs, b"".join(hashes)) == expected
    assert pagedelta.pack_table(list(vaddrs), bytearray(b"".join(hashes))) == expected
    monkeypatch.setattr(sys, "byteorder", "big")
    assert pagedelta.pack_table(vaddrs, b"".join(hashes)) == expected
    with pytest.raises(ValueError):
        pagedelta.pack_table(vaddrs, b"x" * 16)


def test_a_page_table_reads_back_as_address_and_hash_columns(tmp_path, pool):
    chunks = ChunkStore(str(tmp_path / "chunks"))
    data = random.Random(5).randbytes(NPAGES * PAGE)
    entry = full_entry(chunks, pool, write_pages(tmp_path / "pages-1.img", data))
    vaddrs, hashes = pagedelta.load_columns(chunks, entry, "image pages-1.img")
    assert list(vaddrs) == list(pagedelta.run_vaddrs(RUNS))
    assert hashes == b"".join(pagedelta.page_hash(data[i * PAGE:(i + 1) * PAGE]) for i in range(NPAGES))
    assert pagedelta.load_columns(chunks, dataclasses.replace(entry, pagetable=None), "x") is None


def test_a_delta_over_a_generation_whose_chunks_sha256_named_restores_exactly(tmp_path, pool):
    """An agent of this version checkpoints a job whose last generation an older one wrote (manifest format 3,
    chunks named by sha256, as checkpoint.chunk_digest: sha256 still names them): the delta's unchanged runs point
    into those chunks, and its new chunks are named by BLAKE3; the restore checks each by the digest it is referenced
    by."""
    older = ChunkStore(str(tmp_path / "chunks"), compression="none", digest="sha256")
    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")
    data = bytearray(random.Random(1).randbytes(NPAGES * PAGE))
    entry = full_entry(older, pool, write_pages(tmp_path / "p0", data))
    assert all(r.digest == hashlib.sha256(chunks.get(r)).hexdigest() for r in entry.chunks)
    data = changed(data, 0.05, 7)
    delta, _ = pagedelta.store_delta(chunks, pool, write_pages(tmp_path / "p1", data), RUNS, entry, "x")
    assert delta is not None and delta.slices is not None
    old = {r.digest for r in entry.chunks}
    shared = [r for r in delta.chunks if r.digest in old]
    fresh = [r for r in delta.chunks if r.digest not in old]
    assert shared and fresh, "the delta both reuses the old chunks and writes new ones"
    assert all(r.digest == blake3.blake3(chunks.get(r)).hexdigest() for r in fresh)
    assert restored(chunks, delta, tmp_path / "r", pool) == bytes(data)
    victim = shared[0]
    with open(chunks.path(victim), "r+b") as fh:
        fh.write(b"\xff" * 16)
    chunkstore.CHECKED.forget(chunks.root, victim)
    with pytest.raises(DamagedCheckpointError, match="fails its checksum"):
        restored(chunks, delta, tmp_path / "r2", pool)
