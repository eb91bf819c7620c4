"""ckpt_agent.store.chunks: content-addressed chunks, compression only where it pays, damage named, sparse restore."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import threading
import time
from pathlib import Path

import blake3
import pytest
from ckpt_helpers import CallCounter

from ckpt_agent.errors import EXIT_DAMAGED, DamagedCheckpointError, StoreError
from ckpt_agent.store import chunks as chunkstore
from ckpt_agent.store.chunks import (
    CHUNK_BYTES,
    CODEC_RAW,
    CODEC_ZSTD,
    ChunkRef,
    ChunkStore,
    ReadBuffers,
    file_ranges,
    iter_chunk_files,
    restore_file,
    store_file,
)

MIB = 1 << 20


def random_bytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n) if hasattr(random.Random, "randbytes") else os.urandom(n)


def text_bytes(n: int, seed: int = 2) -> bytes:
    rng = random.Random(seed)
    out = []
    size = 0
    while size < n:
        line = f"M{size} net_{rng.randrange(1 << 20)} net_{rng.randrange(1 << 20)} vss nch W={rng.randrange(400)}u\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def chunk_files(store: ChunkStore):
    return sorted(p for _, p in iter_chunk_files(store.root))


def test_put_get_round_trip_names_chunk_by_blake3(chunks):
    data = random_bytes(300_000)
    ref, stats = chunks.put(data)
    assert ref.digest == blake3.blake3(data).hexdigest()
    assert ref.size == len(data)
    assert chunks.get(ref) == data
    assert os.path.exists(os.path.join(chunks.root, ref.digest[:2], ref.digest))
    assert (stats.bytes_in, stats.bytes_new, stats.bytes_written, stats.chunks_new) == (len(data), len(data),
                                                                                           len(data), 1)
    assert ChunkRef.from_json(ref.to_json()) == ref


def test_same_data_is_stored_once(chunks):
    data = random_bytes(200_000)
    ref1, first = chunks.put(data)
    ref2, second = chunks.put(data)
    assert ref1 == ref2
    assert (second.chunks_reused, second.chunks_new, second.bytes_new, second.bytes_written) == (1, 0, 0, 0)
    assert len(chunk_files(chunks)) == 1


def test_chunk_already_on_disk_is_not_rewritten_by_a_new_writer(chunks, tmp_path):
    data = random_bytes(100_000)
    ref, _ = chunks.put(data)
    mtime = os.stat(chunks.path(ref)).st_mtime_ns
    again = ChunkStore(chunks.root)  # a later checkpoint that does not know the chunk from a manifest
    _, stats = again.put(data)
    assert stats.bytes_written == 0
    assert os.stat(chunks.path(ref)).st_mtime_ns == mtime


@pytest.mark.parametrize(
    "make, codec",
    [
        pytest.param(lambda: random_bytes(MIB), CODEC_RAW, id="random-stored-raw"),
        pytest.param(lambda: bytes(MIB), CODEC_ZSTD, id="zeros-compressed"),
        pytest.param(lambda: text_bytes(MIB), CODEC_ZSTD, id="text-compressed"),
        pytest.param(lambda: bytes(100), CODEC_RAW, id="tiny-stored-raw"),
    ],
)
def test_compression_only_where_it_pays(chunks, make, codec):
    data = make()
    ref, stats = chunks.put(data)
    assert ref.codec == codec
    assert chunks.get(ref) == data
    on_disk = os.path.getsize(chunks.path(ref))
    assert stats.bytes_written == on_disk
    if codec == CODEC_ZSTD:
        assert chunks.path(ref).endswith(".zst")
        assert on_disk < 0.9 * len(data)
    else:
        assert on_disk == len(data)


def test_random_head_with_compressible_tail_is_judged_by_the_probe(chunks):
    """The probe samples the whole chunk: a random first 64 KiB (a header) does not make compressible data raw."""
    data = random_bytes(chunkstore.COMPRESS_PROBE_BYTES) + bytes(MIB - chunkstore.COMPRESS_PROBE_BYTES)
    ref, _ = chunks.put(data)
    assert ref.codec == CODEC_ZSTD


def test_compression_none_stores_everything_raw(tmp_path):
    store = ChunkStore(str(tmp_path / "c"), compression="none")
    ref, _ = store.put(bytes(MIB))
    assert ref.codec == CODEC_RAW
    assert os.path.getsize(store.path(ref)) == MIB


def damage(path: str, how: str) -> None:
    if how == "missing":
        os.unlink(path)
    elif how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif how == "flipped":
        with open(path, "r+b") as fh:
            fh.seek(os.path.getsize(path) // 2)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("how, words", [("missing", "is missing"), ("truncated", "fails its checksum"),
                                        ("flipped", "fails its checksum")])
def test_damaged_raw_chunk_is_named(chunks, how, words):
    ref, _ = chunks.put(random_bytes(MIB))
    damage(chunks.path(ref), how)
    with pytest.raises(DamagedCheckpointError) as exc:
        chunks.get(ref, "image pages-1.img")
    msg = str(exc.value)
    assert msg.startswith("image pages-1.img: chunk " + ref.digest[:16])
    assert words in msg
    assert exc.value.exit_code == EXIT_DAMAGED


@pytest.mark.parametrize("how", ["missing", "truncated", "flipped"])
def test_damaged_compressed_chunk_is_named(chunks, how):
    ref, _ = chunks.put(text_bytes(MIB))
    assert ref.codec == CODEC_ZSTD
    damage(chunks.path(ref), how)
    with pytest.raises(DamagedCheckpointError) as exc:
        chunks.get(ref, "file /scratch/x")
    assert ref.digest[:16] in str(exc.value)
    assert "/scratch/x" in str(exc.value)


@pytest.mark.parametrize("make, size", [(random_bytes, MIB), (random_bytes, 4095), (random_bytes, 4096),
                                        (random_bytes, 1), (text_bytes, MIB)])
def test_a_chunk_read_around_the_page_cache_is_the_chunk_get_reads(chunks, make, size):
    """A restore reads chunks with O_DIRECT into reused buffers: a raw chunk comes back as a view of the buffer (the
    caller gives it back once done), a compressed one as bytes of its own (its buffer already given back)."""
    data = make(size)
    ref, _ = chunks.put(data)
    buffers = ReadBuffers()
    got, buf = chunks.get_direct(ref, "image pages-1.img", buffers)
    assert bytes(got) == data == chunks.get(ref) and buffers.direct
    if ref.codec == CODEC_ZSTD:
        assert buf is None and len(buffers._idle) == 1
    else:
        assert buf is not None and not buffers._idle
        assert buf.address == ctypes.addressof(ctypes.c_char.from_buffer(buf))  # what vmsplice is handed
        buffers.give(buf)
        again, buf2 = chunks.get_direct(ref, "", buffers)
        assert buf2 is buf and bytes(again) == data  # the buffer is reused


@pytest.mark.parametrize("how, words", [("missing", "is missing"), ("truncated", "fails its checksum"),
                                        ("flipped", "fails its checksum")])
@pytest.mark.parametrize("make", [random_bytes, text_bytes])
def test_a_damaged_chunk_read_around_the_page_cache_is_named_and_its_buffer_kept(chunks, how, words, make):
    ref, _ = chunks.put(make(MIB))
    damage(chunks.path(ref), how)
    buffers = ReadBuffers()
    with pytest.raises(DamagedCheckpointError) as exc:
        chunks.get_direct(ref, "image pages-1.img", buffers)
    assert str(exc.value).startswith("image pages-1.img: chunk " + ref.digest[:16])
    assert words in str(exc.value) or (ref.codec == CODEC_ZSTD and "corrupt" in str(exc.value))
    assert len(buffers._idle) == 1  # taken and given back


def test_a_chunk_grown_beyond_its_size_or_a_link_or_fifo_in_its_place_is_refused_around_the_page_cache(chunks,
                                                                                                    tmp_path):
    ref, _ = chunks.put(random_bytes(MIB))
    path = chunks.path(ref)
    with open(path, "ab") as fh:
        fh.write(b"x" * 5000)
    with pytest.raises(DamagedCheckpointError, match="more than the"):
        chunks.get_direct(ref, "", ReadBuffers())
    other = tmp_path / "elsewhere"
    other.write_bytes(random_bytes(MIB))
    os.unlink(path)
    os.symlink(other, path)
    with pytest.raises(DamagedCheckpointError, match="symbolic link"):
        chunks.get_direct(ref, "", ReadBuffers())
    os.unlink(path)
    os.mkfifo(path)  # never waited on
    with pytest.raises(DamagedCheckpointError, match="special file|not a regular file"):
        chunks.get_direct(ref, "", ReadBuffers())


def test_a_file_system_that_refuses_o_direct_is_read_through_the_page_cache(chunks, monkeypatch):
    data = random_bytes(MIB)
    ref, _ = chunks.put(data)
    real_open = os.open

    def no_direct(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    buffers = ReadBuffers()
    got, buf = chunks.get_direct(ref, "", buffers)
    assert got == data and buf is None and not buffers.direct
    got, buf = chunks.get_direct(ref, "", buffers)  # the store is not tried again
    assert got == data and buf is None


def test_chunk_swapped_for_another_valid_chunk_fails_its_checksum(chunks):
    a, _ = chunks.put(random_bytes(4096, seed=1))
    b, _ = chunks.put(random_bytes(4096, seed=2))
    os.replace(chunks.path(b), chunks.path(a))
    with pytest.raises(DamagedCheckpointError, match="fails its checksum"):
        chunks.get(a)


@pytest.mark.parametrize(
    "size, cuts, expected",
    [
        pytest.param(0, None, [], id="empty"),
        pytest.param(10, None, [(0, 10)], id="small"),
        pytest.param(CHUNK_BYTES, None, [(0, CHUNK_BYTES)], id="exactly-one"),
        pytest.param(2 * CHUNK_BYTES + 5, None,
                     [(0, CHUNK_BYTES), (CHUNK_BYTES, 2 * CHUNK_BYTES), (2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 5)],
                     id="split-at-chunk-size"),
        pytest.param(3 * CHUNK_BYTES, [4096, 4096, 0, 3 * CHUNK_BYTES, 10 * CHUNK_BYTES],
                     [(0, 4096), (4096, 4096 + CHUNK_BYTES), (4096 + CHUNK_BYTES, 4096 + 2 * CHUNK_BYTES),
                      (4096 + 2 * CHUNK_BYTES, 3 * CHUNK_BYTES)],
                     id="cuts-deduplicated-out-of-range-ignored"),
        pytest.param(100, [90, 10, 50], [(0, 10), (10, 50), (50, 90), (90, 100)], id="unsorted-cuts"),
    ],
)
def test_file_ranges(size, cuts, expected):
    ranges = file_ranges(size, cuts)
    assert ranges == expected
    assert all(0 < end - start <= CHUNK_BYTES for start, end in ranges)


def test_store_and_restore_file_round_trip_keeps_zero_chunks_sparse(chunks, pool, tmp_path):
    src = tmp_path / "src.bin"
    content = random_bytes(MIB + 123) + bytes(3 * MIB - 123) + text_bytes(MIB // 2)
    src.write_bytes(content)
    refs, stats, size = store_file(chunks, str(src), pool)
    assert size == len(content)
    assert [r.size for r in refs] == [MIB, MIB, MIB, MIB, MIB // 2]
    assert stats.bytes_in == len(content)
    assert stats.chunks_new + stats.chunks_reused == 5
    assert refs[2] == refs[3]  # the two all-zero chunks are one chunk
    assert len(chunk_files(chunks)) == 4

    dest = tmp_path / "out" / "restored.bin"
    dest.parent.mkdir()
    restore_file(chunks, refs, str(dest), pool, mode=0o640)
    assert dest.read_bytes() == content
    assert dest.stat().st_mode & 0o777 == 0o640
    allocated = dest.stat().st_blocks * 512
    assert allocated <= len(content) - 2 * MIB + 64 * 1024, "two all-zero chunks must stay holes"
    assert os.listdir(dest.parent) == ["restored.bin"]


def test_restore_file_with_damaged_chunk_leaves_no_file(chunks, pool, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(random_bytes(2 * MIB))
    refs, _, _ = store_file(chunks, str(src), pool)
    damage(chunks.path(refs[1]), "flipped")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DamagedCheckpointError, match=refs[1].digest[:16]):
        restore_file(chunks, refs, str(out / "f"), pool, where="file /x/f")
    assert os.listdir(out) == []


def test_restore_file_replaces_existing_file_atomically(chunks, pool, tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"new content")
    refs, _, _ = store_file(chunks, str(src), pool)
    dest = tmp_path / "dest"
    dest.write_bytes(b"old, longer content that must go entirely")
    restore_file(chunks, refs, str(dest), pool)
    assert dest.read_bytes() == b"new content"


def test_temporary_chunk_names_never_count_as_chunks(chunks, monkeypatch):
    """A writer killed between write and rename leaves a temp file: never visible under a final chunk name."""
    data = random_bytes(50_000)

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chunkstore.os, "rename", crash)
    with pytest.raises(StoreError, match="cannot write chunk .*: No space left on device"):
        chunks.put(data)
    monkeypatch.undo()
    digest = blake3.blake3(data).hexdigest()
    final = chunks.path(ChunkRef(digest, len(data), CODEC_RAW))
    assert not os.path.exists(final)
    assert digest not in chunks.known
    assert list(iter_chunk_files(chunks.root)) == [], "a failed write removes its temp file"
    Path(f"{final}.tmp-1-2").write_bytes(data[:100])  # what a writer killed before its rename leaves
    leftovers = list(iter_chunk_files(chunks.root))
    assert len(leftovers) == 1 and leftovers[0][0] == "", "a temp file must not be reported under a digest"

    ref, stats = chunks.put(data)  # the next attempt writes the chunk for real
    assert stats.bytes_written == len(data)
    assert chunks.get(ref) == data


def test_iter_chunk_files_reports_digests_without_codec_suffix(chunks):
    raw, _ = chunks.put(random_bytes(10_000))
    packed, _ = chunks.put(bytes(MIB))
    found = {d for d, _ in iter_chunk_files(chunks.root)}
    assert found == {raw.digest, packed.digest}


def test_iter_chunk_files_on_missing_root_is_empty(tmp_path):
    assert list(iter_chunk_files(str(tmp_path / "nope"))) == []


def test_all_zero_chunk_is_recognised_without_hashing(chunks, monkeypatch):
    """A full all-zero chunk gets the BLAKE3 digest of zeros by a compare (the fast path); anything else is hashed."""
    calls = []
    real = blake3.blake3

    def counting(data=b""):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(chunkstore.blake3, "blake3", counting)
    ref, _ = chunks.put(bytes(CHUNK_BYTES))
    assert ref.digest == real(bytes(CHUNK_BYTES)).hexdigest() == chunkstore.ZERO_CHUNK_DIGEST
    assert calls == []
    assert chunks.get(ref) == bytes(CHUNK_BYTES)
    almost = bytearray(CHUNK_BYTES)
    almost[-1] = 1
    other, _ = chunks.put(bytes(almost))
    short, _ = chunks.put(bytes(CHUNK_BYTES - 1))
    assert other.digest == real(bytes(almost)).hexdigest()
    assert short.digest == real(bytes(CHUNK_BYTES - 1)).hexdigest()
    assert calls == [CHUNK_BYTES, CHUNK_BYTES - 1]


def plant_sha256_chunk(store: ChunkStore, data: bytes, codec: str = CODEC_RAW) -> ChunkRef:
    """A chunk as formats 1-3 wrote it: named by the sha256 of its bytes."""
    ref = ChunkRef(hashlib.sha256(data).hexdigest(), len(data), codec)
    path = Path(store.path(ref))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(chunkstore.zstandard.ZstdCompressor().compress(data) if codec == CODEC_ZSTD else data)
    return ref


@pytest.mark.parametrize("codec", [CODEC_RAW, CODEC_ZSTD])
def test_a_chunk_named_by_sha256_before_format_4_still_reads_and_is_still_checked(chunks, codec):
    data = text_bytes(300_000, seed=11)
    ref = plant_sha256_chunk(chunks, data, codec)
    assert chunks.get(ref) == data
    damaged = bytearray(data)
    damaged[1234] ^= 1
    Path(chunks.path(ref)).write_bytes(chunkstore.zstandard.ZstdCompressor().compress(bytes(damaged))
                                       if codec == CODEC_ZSTD else bytes(damaged))
    with pytest.raises(DamagedCheckpointError, match=f"chunk {ref.digest[:16]} fails its checksum"):
        chunks.get(ref)


def test_a_chunk_is_not_accepted_under_another_chunks_digest(chunks):
    """Either hash must give the referenced digest of the bytes read: another chunk's bytes in its place, whatever
    that one was named by, are refused."""
    a, b = random_bytes(50_000, seed=12), random_bytes(50_000, seed=13)
    ref_a = plant_sha256_chunk(chunks, a)
    ref_b, _ = chunks.put(b)
    for victim, intruder in ((ref_a, b), (ref_b, a)):
        Path(chunks.path(victim)).write_bytes(intruder)
        with pytest.raises(DamagedCheckpointError, match="fails its checksum"):
            chunks.get(victim)


def test_a_store_set_to_sha256_names_chunks_by_sha256_and_reads_both(tmp_path, pool):
    """checkpoint.chunk_digest: sha256, for a site that admits only FIPS-approved hashes."""
    fips = ChunkStore(str(tmp_path / "c"), digest="sha256")
    data = text_bytes(3 * MIB + 5, seed=15)
    src = tmp_path / "src"
    src.write_bytes(data + bytes(CHUNK_BYTES))
    refs, _, _ = store_file(fips, str(src), pool)
    assert [r.digest for r in refs] == [hashlib.sha256(d).hexdigest() for d in (
        data[:MIB], data[MIB:2 * MIB], data[2 * MIB:3 * MIB], data[3 * MIB:] + bytes(MIB - 5), bytes(5))]
    zero, _ = fips.put(bytes(CHUNK_BYTES))
    assert zero.digest == chunkstore.SHA256_ZERO_CHUNK_DIGEST == hashlib.sha256(bytes(CHUNK_BYTES)).hexdigest()
    other, _ = ChunkStore(str(tmp_path / "c")).put(b"blake3-named")
    assert fips.get(other) == b"blake3-named" and fips.get(refs[0]) == data[:MIB]
    with pytest.raises(ValueError, match="unknown chunk digest 'md5'"):
        ChunkStore(str(tmp_path / "c"), digest="md5")


def test_new_data_is_not_deduplicated_against_a_sha256_named_chunk(chunks):
    data = random_bytes(40_000, seed=14)
    old = plant_sha256_chunk(chunks, data)
    chunks.known[old.digest] = old.codec
    ref, stats = chunks.put(data)
    assert ref.digest == blake3.blake3(data).hexdigest() != old.digest
    assert (stats.chunks_new, stats.chunks_reused) == (1, 0)
    assert chunks.get(ref) == chunks.get(old) == data


def test_a_sparse_file_restored_from_sha256_named_zero_chunks_keeps_its_holes(chunks, pool, tmp_path):
    zero = plant_sha256_chunk(chunks, bytes(CHUNK_BYTES))
    assert zero.digest == chunkstore.SHA256_ZERO_CHUNK_DIGEST
    tail = plant_sha256_chunk(chunks, b"end")
    dest = tmp_path / "sparse"
    restore_file(chunks, [zero, zero, tail], str(dest), pool)
    assert dest.read_bytes() == bytes(2 * CHUNK_BYTES) + b"end"
    assert os.stat(dest).st_blocks * 512 < CHUNK_BYTES, "the zero chunks are holes, not written"


def test_zero_chunk_with_wrong_content_fails_its_checksum(chunks):
    ref, _ = chunks.put(bytes(CHUNK_BYTES))
    with open(chunks.path(ref), "wb") as fh:  # a damaged chunk file that still decompresses
        fh.write(chunkstore.zstandard.ZstdCompressor().compress(b"\1" + bytes(CHUNK_BYTES - 1)))
    with pytest.raises(DamagedCheckpointError, match="fails its checksum"):
        chunks.get(ref)


def test_writeback_starts_for_every_chunk_written(chunks, monkeypatch):
    started = []
    monkeypatch.setattr(chunkstore, "start_writeback", lambda fd: started.append(os.readlink(f"/proc/self/fd/{fd}")))
    a, _ = chunks.put(random_bytes(10_000, seed=3))
    chunks.put(random_bytes(10_000, seed=3))  # known: nothing written, no writeback
    b, _ = chunks.put(text_bytes(MIB))
    assert len(started) == 2
    assert all(".tmp-" in p for p in started), "writeback is started before the rename, on the temp file"
    assert os.path.exists(chunks.path(a)) and os.path.exists(chunks.path(b))


def test_start_writeback_is_harmless_on_any_file(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as fh:
        fh.write(b"x" * 10_000)
        chunkstore.start_writeback(fh.fileno())
    assert path.read_bytes() == b"x" * 10_000


def test_chunk_is_stored_raw_instead_of_waiting_for_a_busy_cpu(chunks, monkeypatch):
    """With every compression slot taken, a compressible chunk is stored raw (and reads back), never waits."""
    monkeypatch.setattr(chunkstore, "_compress_slots", threading.BoundedSemaphore(1))
    assert chunkstore._compress_slots.acquire(blocking=False)
    try:
        busy, _ = chunks.put(text_bytes(MIB, seed=5))
    finally:
        chunkstore._compress_slots.release()
    free, _ = chunks.put(text_bytes(MIB, seed=6))
    assert (busy.codec, free.codec) == (CODEC_RAW, CODEC_ZSTD)
    assert chunks.get(busy) == text_bytes(MIB, seed=5)
    assert os.path.getsize(chunks.path(busy)) == MIB


def test_temp_chunk_name_planted_as_a_link_is_not_written_through(chunks, tmp_path):
    data = random_bytes(20_000, seed=7)
    digest = blake3.blake3(data).hexdigest()
    final = chunks.path(ChunkRef(digest, len(data), CODEC_RAW))
    os.makedirs(os.path.dirname(final))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, f"{final}.tmp-{os.getpid()}-{threading.get_ident()}")  # put() runs in this thread
    with pytest.raises(StoreError, match="cannot write chunk"):
        chunks.put(data)
    assert victim.read_bytes() == b"keep"
    assert not os.path.exists(final)


@pytest.mark.parametrize("compressible", [False, True], ids=["raw", "zstd"])
def test_rotten_reused_chunk_is_verified_and_rewritten_from_the_fresh_data(tmp_path, compressible):
    """A chunk at rest that no longer matches its digest is never referenced again unverified: a store that
    verifies reused chunks rewrites it (same name, same codec), which also repairs older manifests' references."""
    data = (b"netlist line 42\n" * 70_000)[:MIB] if compressible else random_bytes(MIB)
    first = ChunkStore(str(tmp_path / "chunks"))
    ref, _ = first.put(data)
    assert ref.codec == (chunkstore.CODEC_ZSTD if compressible else CODEC_RAW)
    path = Path(first.path(ref))
    rotten = bytearray(path.read_bytes())
    rotten[len(rotten) // 2] ^= 0x01
    path.write_bytes(bytes(rotten))
    with pytest.raises(DamagedCheckpointError):
        first.get(ref)

    trusting = ChunkStore(first.root, known={ref.digest: ref.codec})
    again, stats = trusting.put(data)  # without verification the rotten chunk would be referenced again
    assert (again, stats.chunks_reused, stats.chunks_verified) == (ref, 1, 0)

    verifying = ChunkStore(first.root, known={ref.digest: ref.codec})
    verifying.verify_reused = lambda _digest: True
    again, stats = verifying.put(data)
    assert again == ref
    assert (stats.chunks_reused, stats.chunks_verified, stats.chunks_repaired) == (1, 1, 1)
    assert verifying.get(ref) == data
    _, stats = verifying.put(data)  # verified once per checkpoint, not per reference
    assert (stats.chunks_verified, stats.chunks_repaired) == (0, 0)


def test_missing_or_replaced_reused_chunk_is_rewritten(tmp_path):
    data = random_bytes(200_000)
    ref, _ = ChunkStore(str(tmp_path / "chunks")).put(data)
    path = Path(ChunkStore(str(tmp_path / "chunks")).path(ref))
    path.unlink()
    os.mkfifo(path)  # a FIFO where the chunk was: verification must neither hang nor trust it
    store = ChunkStore(str(tmp_path / "chunks"), known={ref.digest: ref.codec})
    store.verify_reused = lambda _digest: True
    _, stats = store.put(data)
    assert stats.chunks_repaired == 1
    assert path.is_file() and store.get(ref) == data


def test_sampled_verification_skips_chunks_outside_the_slice(tmp_path):
    data = random_bytes(100_000)
    ref, _ = ChunkStore(str(tmp_path / "chunks")).put(data)
    store = ChunkStore(str(tmp_path / "chunks"), known={ref.digest: ref.codec})
    store.verify_reused = lambda digest: digest != ref.digest
    _, stats = store.put(data)
    assert (stats.chunks_reused, stats.chunks_verified) == (1, 0)


# --- checking a reused chunk by its stat (a final checkpoint's chunks outside the scrub slice) ---------------------
def _reads(monkeypatch) -> CallCounter:
    """Counts the chunk files the store reads back."""
    return CallCounter(monkeypatch, chunkstore, "read_regular_stat")


def _final_store(root: str, ref: ChunkRef, scrubbed=lambda _d: False) -> ChunkStore:
    store = ChunkStore(root, known={ref.digest: ref.codec})
    store.verify_reused = lambda _digest: True  # a final checkpoint checks every reused chunk
    store.scrub = scrubbed
    return store


def test_a_chunk_unchanged_since_this_process_wrote_it_is_checked_by_its_stat(tmp_path, monkeypatch):
    data = random_bytes(MIB)
    ref, _ = ChunkStore(str(tmp_path / "chunks")).put(data)
    reads = _reads(monkeypatch)
    store = _final_store(str(tmp_path / "chunks"), ref)
    again, stats = store.put(data)
    assert again == ref and (stats.chunks_verified, stats.chunks_repaired) == (1, 0)
    assert reads.n == 0  # one stat, no read
    assert store.intact(ref) and reads.n == 0

    scrubbing = _final_store(str(tmp_path / "chunks"), ref, scrubbed=lambda _d: True)
    scrubbing.put(data)  # in the scrub slice: re-read all the same (rot below the file system shows in no stat)
    assert reads.n == 1


@pytest.mark.parametrize("how", ["flip", "truncate", "replace"])
def test_a_chunk_changed_after_it_was_checked_is_re_read_and_repaired(tmp_path, monkeypatch, how):
    """Any change through the file system (a write, a truncation, another file renamed in its place) shows in the
    stat, however soon after the write it happens, so the chunk is re-read, found rotten and rewritten."""
    data = random_bytes(MIB)
    root = str(tmp_path / "chunks")
    ref, _ = ChunkStore(root).put(data)
    path = Path(ChunkStore(root).path(ref))
    rotten = bytearray(path.read_bytes())
    rotten[12345] ^= 0x10
    if how == "flip":
        before = os.stat(path)
        with open(path, "r+b") as fh:
            fh.write(bytes(rotten))
        after = os.stat(path)
        if (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns):
            # a kernel without fine-grained timestamps (< 6.13) and a write within the same tick as the chunk's:
            # the window chunks.py documents; a write a tick later is what this test then stands for
            os.utime(path, ns=(after.st_atime_ns, after.st_mtime_ns + 10_000_000))
    elif how == "truncate":
        os.truncate(path, MIB // 2)
    else:
        other = path.with_name("planted")
        other.write_bytes(bytes(rotten))
        os.rename(other, path)
    reads = _reads(monkeypatch)
    store = _final_store(root, ref)
    assert not store.intact(ref)
    _, stats = store.put(data)
    assert (stats.chunks_verified, stats.chunks_repaired) == (1, 1) and reads.n >= 1
    assert store.get(ref) == data


def test_a_chunk_this_process_never_checked_is_re_read(tmp_path, monkeypatch):
    data = random_bytes(300_000)
    root = str(tmp_path / "chunks")
    ref, _ = ChunkStore(root).put(data)
    monkeypatch.setattr(chunkstore, "CHECKED", chunkstore.CheckedFiles())  # a new process: nothing remembered
    reads = _reads(monkeypatch)
    store = _final_store(root, ref)
    assert store.intact(ref) and reads.n == 1
    assert store.intact(ref) and reads.n == 1  # found whole by that read: remembered


def test_checked_files_remember_the_stores_used_last():
    checked = chunkstore.CheckedFiles()
    ref = ChunkRef("ab" * 32, 10, CODEC_RAW)
    st = os.stat(__file__)
    for i in range(checked.MAX_ROOTS + 1):
        checked.record(f"/store/job{i}/chunks", ref, st)
    assert not checked.unchanged("/store/job0/chunks", ref, st)  # the oldest store is forgotten
    assert checked.unchanged(f"/store/job{checked.MAX_ROOTS}/chunks", ref, st)
    assert not checked.unchanged(f"/store/job{checked.MAX_ROOTS}/chunks", ChunkRef("cd" * 32, 10, CODEC_RAW), st)


# --- codec choice against the store's bandwidth --------------------------------------------------------------------
def test_level_is_the_best_ratio_that_keeps_up_with_the_store():
    speeds = {1: 200e6, -1: 400e6, -3: 600e6, -5: 800e6}
    assert chunkstore.choose_level(None, speeds, slots=1) == 1  # unknown bandwidth: as before
    assert chunkstore.choose_level(150e6, speeds, slots=1) == 1  # FSx at 150 MB/s: level 1 keeps up
    assert chunkstore.choose_level(500e6, speeds, slots=1) == -3  # a local NVMe disk: a fast level
    assert chunkstore.choose_level(500e6, speeds, slots=4) == 1  # ... unless many cores compress at once
    assert chunkstore.choose_level(5e9, speeds, slots=1) is None  # nothing keeps up: raw
    assert chunkstore.choose_level(5e9, speeds, slots=9) == -3  # ... unless enough cores compress at once


def test_a_store_that_no_level_keeps_up_with_stores_chunks_raw_but_the_zero_chunk(tmp_path, monkeypatch):
    """Where the store takes bytes faster than zstd's fastest level on the free cores, compressing costs more time than
    it saves: compressible chunks are stored raw. The all-zero chunk (once per job) is still compressed."""
    monkeypatch.setattr(chunkstore, "store_bandwidth", lambda _root: 1e12)
    chunks = ChunkStore(str(tmp_path / "c"))
    text, _ = chunks.put(text_bytes(MIB))
    zero, _ = chunks.put(bytes(MIB))
    assert chunks.level is None
    assert (text.codec, zero.codec) == (CODEC_RAW, CODEC_ZSTD)
    assert os.path.getsize(chunks.path(text)) == MIB and os.path.getsize(chunks.path(zero)) < 4096
    assert chunks.get(text) == text_bytes(MIB) and chunks.get(zero) == bytes(MIB)
    slow = ChunkStore(str(tmp_path / "d"))
    monkeypatch.setattr(chunkstore, "store_bandwidth", lambda _root: 1e6)  # FSx's share of a reclaimed node, say
    assert slow.put(text_bytes(MIB))[0].codec == CODEC_ZSTD and slow.level in chunkstore.ZSTD_LEVELS


SPEEDS = {1: 200e6, -1: 400e6, -3: 600e6, -5: 800e6}  # bytes/s a core, as codec_speeds measures them
RATIOS = {1: 0.30, -1: 0.40, -3: 0.45, -5: 0.50}  # compressed/raw on netlist-like text, as codec_ratios measures them


def test_the_write_pace_is_the_median_of_the_recent_chunk_writes():
    pace = chunkstore.WritePace(window=4)
    assert pace.seconds_per_byte is None
    pace.record(MIB, 0.001)
    pace.record(4096, 10.0)  # too small to time: its fixed costs would pass for a slow store
    assert pace.seconds_per_byte == pytest.approx(0.001 / MIB)
    for seconds in (0.5, 0.001, 0.002):  # one write that waited for a CPU among fast ones
        pace.record(MIB, seconds)
    assert pace.seconds_per_byte == pytest.approx(0.002 / MIB)
    for seconds in (0.04, 0.05, 0.06):  # the file system holds every writer back: the older ones drop out
        pace.record(MIB, seconds)
    assert pace.seconds_per_byte == pytest.approx(0.05 / MIB)


def test_the_paced_level_is_the_one_that_stores_a_byte_soonest_or_none():
    assert chunkstore.paced_level(None, SPEEDS, RATIOS) is None  # nothing timed yet
    assert chunkstore.paced_level(1 / 1e9, SPEEDS, RATIOS) is None  # 1 GB/s: the page cache; raw is sooner
    # 100 MB/s a worker: -3 takes 1/600e6 + 0.45/100e6 s a byte, less than raw's 1/100e6 and than the other levels
    assert chunkstore.paced_level(1 / 100e6, SPEEDS, RATIOS) == -3
    assert chunkstore.paced_level(1 / 10e6, SPEEDS, RATIOS) == 1  # 10 MB/s: the best ratio wins
    assert chunkstore.paced_level(1 / 10e6, SPEEDS, {}) is None  # no measured ratio: no model, raw


class SlowWrites:
    """A store's writer (ChunkStore's `writer`) with a switch that makes each chunk write take 20 ms more (50 MB/s
    or less for a MiB): FSx at a mass reclaim. `store(root)` is a ChunkStore writing through it."""

    def __init__(self):
        self.slow = threading.Event()

    def write(self, fd, data):
        chunkstore.write_all(fd, data)
        if self.slow.is_set():
            time.sleep(0.02)

    def store(self, root):
        return ChunkStore(str(root), writer=self.write)


@pytest.fixture
def fast_probe_slow_writes(monkeypatch):
    """A store whose probe found it faster than every level (choose_level: raw), with the codecs' figures fixed,
    written through SlowWrites."""
    monkeypatch.setattr(chunkstore, "store_bandwidth", lambda _root: 1e12)
    monkeypatch.setattr(chunkstore, "_speeds", dict(SPEEDS))
    monkeypatch.setattr(chunkstore, "_ratios", dict(RATIOS))
    return SlowWrites()


def test_a_store_raw_by_its_probe_compresses_once_its_writes_slow_down(tmp_path, fast_probe_slow_writes):
    chunks = fast_probe_slow_writes.store(tmp_path / "c")
    texts = [text_bytes(MIB, seed=10 + i) for i in range(6)]
    first, _ = chunks.put(texts[0])
    assert chunks.level is None and first.codec == CODEC_RAW  # the page cache's pace: raw, as the probe chose
    fast_probe_slow_writes.slow.set()
    refs = [chunks.put(t)[0] for t in texts[1:]]
    # the first slow write is one of two timed: the median is then the slow one, and every later chunk compresses
    assert [r.codec for r in refs] == [CODEC_RAW] + [CODEC_ZSTD] * 4
    assert all(os.path.getsize(chunks.path(r)) < MIB * (1 - chunkstore.COMPRESS_MIN_SAVING) for r in refs[1:])
    assert [chunks.get(r) for r in refs] == texts[1:]
    random_ref, stats = chunks.put(random_bytes(MIB, seed=5))  # incompressible: its sample says so, raw
    assert random_ref.codec == CODEC_RAW and stats.bytes_written == MIB


def test_a_store_raw_by_its_probe_stays_raw_while_its_writes_keep_up(tmp_path, fast_probe_slow_writes, monkeypatch):
    monkeypatch.setattr(chunkstore, "_speeds", {level: 1e3 for level in SPEEDS})  # no write is slower than this
    chunks = fast_probe_slow_writes.store(tmp_path / "c")
    refs = [chunks.put(text_bytes(MIB, seed=20 + i))[0] for i in range(4)]
    assert chunks.pace.seconds_per_byte is not None
    assert {r.codec for r in refs} == {CODEC_RAW}


def test_a_paced_chunk_is_stored_raw_when_no_compression_slot_is_free(tmp_path, fast_probe_slow_writes):
    fast_probe_slow_writes.slow.set()
    chunks = fast_probe_slow_writes.store(tmp_path / "c")
    chunks.put(text_bytes(MIB, seed=30))  # timed: slow
    held = 0
    try:
        while chunkstore._compress_slots.acquire(blocking=False):
            held += 1
        assert chunks.put(text_bytes(MIB, seed=31))[0].codec == CODEC_RAW
    finally:
        for _ in range(held):
            chunkstore._compress_slots.release()
    assert chunks.put(text_bytes(MIB, seed=32))[0].codec == CODEC_ZSTD


def test_the_compression_probe_samples_the_whole_chunk():
    # compressible at the start, random everywhere else: the sample sees mostly random data
    data = bytes(64 << 10) + random_bytes(CHUNK_BYTES - (64 << 10))
    sample = chunkstore.probe(data)
    assert len(sample) == chunkstore.COMPRESS_PROBE_BYTES
    assert sample.count(0) < len(sample) // 2
    chunks = ChunkStore("/nonexistent")
    chunks._level = 1
    assert chunks._compress(data)[1] == CODEC_RAW


@pytest.mark.real_store_bandwidth
def test_store_bandwidth_is_measured_once_and_leaves_nothing(tmp_path):
    first = chunkstore.store_bandwidth(str(tmp_path))
    assert first and first > 0
    assert os.listdir(tmp_path) == []
    assert chunkstore.store_bandwidth(str(tmp_path)) == first  # cached per file system
    assert chunkstore.store_bandwidth(str(tmp_path / "missing")) is None


def _listing_at_fdatasync(monkeypatch, root):
    """The names in `root` while the bandwidth probe waits for its fdatasync."""
    seen = []
    real = os.fdatasync

    def spy(fd):
        seen.append(sorted(os.listdir(root)))
        return real(fd)

    monkeypatch.setattr(chunkstore, "_bandwidths", {})
    monkeypatch.setattr(chunkstore.os, "fdatasync", spy)
    return seen


@pytest.mark.real_store_bandwidth
def test_the_bandwidth_probe_has_no_name_a_killed_process_could_leave_behind(tmp_path, monkeypatch):
    seen = _listing_at_fdatasync(monkeypatch, tmp_path)
    assert chunkstore.store_bandwidth(str(tmp_path)) > 0
    assert seen == [[]], "the probe was a named file while it was written"
    assert os.listdir(tmp_path) == []


@pytest.mark.real_store_bandwidth
def test_the_bandwidth_probe_falls_back_to_a_named_file(tmp_path, monkeypatch):
    """A file system without unnamed files (EOPNOTSUPP): a named probe, removed afterwards."""
    seen = _listing_at_fdatasync(monkeypatch, tmp_path)
    real_open = os.open

    def no_tmpfile(path, flags, *a, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(chunkstore.os, "open", no_tmpfile)
    assert chunkstore.store_bandwidth(str(tmp_path)) > 0
    assert seen == [[f".bandwidth-probe.tmp-{os.getpid()}"]]
    assert os.listdir(tmp_path) == []


@pytest.mark.real_store_bandwidth
def test_warm_up_measures_ahead_so_the_first_compression_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkstore, "_speeds", {})
    monkeypatch.setattr(chunkstore, "_bandwidths", {})
    monkeypatch.setattr(chunkstore, "_warmed", set())
    thread = chunkstore.warm_up(str(tmp_path))
    assert thread is not None and thread.daemon
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert set(chunkstore._speeds) == set(chunkstore.ZSTD_LEVELS)
    assert os.stat(tmp_path).st_dev in chunkstore._bandwidths
    assert chunkstore.warm_up(str(tmp_path)) is None, "asked once per process and store"
    assert os.listdir(tmp_path) == []

    def measuring_again(*_a):
        raise AssertionError("measured inside the checkpoint")

    monkeypatch.setattr(chunkstore, "_text_sample", measuring_again)
    monkeypatch.setattr(chunkstore, "_probe_file", measuring_again)
    chunks = ChunkStore(str(tmp_path))
    dev = os.stat(tmp_path).st_dev
    assert chunks.level == chunkstore.choose_level(chunkstore._bandwidths[dev], chunkstore._speeds)  # as measured


@pytest.mark.parametrize("level", chunkstore.ZSTD_LEVELS)
def test_every_level_round_trips(tmp_path, level):
    chunks = ChunkStore(str(tmp_path / "c"))
    chunks._level = level
    data = text_bytes(CHUNK_BYTES)
    ref, _ = chunks.put(data)
    assert ref.codec == CODEC_ZSTD
    assert chunks.get(ref) == data


def test_reused_chunks_are_checked_in_a_bounded_number_of_batches(tmp_path):
    """ChunkStore.rotten: every chunk checked, the rotten ones named, in at most CHECK_BATCHES pool tasks (a task
    per chunk cost the pool more than the checks: half a million chunks for a 500 GiB job)."""
    import concurrent.futures

    root = str(tmp_path / "chunks")
    writer = ChunkStore(root, compression="none")
    refs = [writer.put(random_bytes(4096, seed))[0] for seed in range(3 * chunkstore.CHECK_BATCHES + 5)]
    with open(writer.path(refs[7]), "r+b") as fh:
        fh.write(b"rot")
    os.unlink(writer.path(refs[20]))
    store = ChunkStore(root, compression="none", known={r.digest: r.codec for r in refs})
    store.verify_reused, store.scrub = (lambda _d: True), (lambda _d: False)  # a final checkpoint's checks
    tasks = []

    class Counting(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            tasks.append(fn)
            return super().submit(fn, *args, **kwargs)

    with Counting(4) as pool:
        assert store.rotten(refs, pool, "x") == {refs[7].digest, refs[20].digest}
        assert store.rotten([], pool) == set()
    assert 0 < len(tasks) <= chunkstore.CHECK_BATCHES
