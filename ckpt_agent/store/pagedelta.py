"""Page-granular incrementals of CRIU page images, on every kernel (no soft-dirty tracking needed).

Each stored pages-N.img carries a page table: for every page it holds, in file order, its virtual address and a fast
non-cryptographic hash of its bytes (4 KiB pages on x86): xxh3-128 from the xxhash wheel (~10 GB/s; without the
wheel, PAGE_HASH is None and images are stored in address-window chunks only, as before). The next checkpoint hashes
the freshly dumped pages and compares them, by address, with the previous generation's table: only the pages that
changed are written, packed together into new chunks; the image is then described as slices of chunks (`slices`:
[chunk index, offset, length] over the image's `chunks`, stored in chunks of their own: the entry's slice table,
manifest format 3), the unchanged runs pointing into chunks the previous generation already uses. Every chunk is
still named and checked by its digest (chunks.chunk_digest), so a restore reads only verified data, and a generation
referring to a damaged chunk of an older one is damaged itself (the restore falls back to an older generation). Slices
are always resolved to chunks, never to an older manifest: a restore reads no chain of generations, and gc keeps
whatever a kept manifest lists.

Compaction: a delta image is written in full instead (address-window chunks, as without a previous generation) when
more than MAX_CHANGED_SHARE of its pages changed, when MAX_DELTA_DEPTH deltas already follow the last full one, or
when restoring it would read more than MAX_READ_AMPLIFICATION times its size (chunks only partly still in use).
A reused chunk is checked first when the checkpoint's policy picks it (engine.reuse_checks: a periodic checkpoint
re-reads its scrub slice, a final one checks every reused chunk by its stat); one that fails its checksum makes the
image be written in full.
"""

from __future__ import annotations

import array
import bisect
import concurrent.futures
import mmap
import os
import struct
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ckpt_agent.errors import DamagedCheckpointError
from ckpt_agent.store.chunks import (
    CHUNK_BYTES,
    ChunkRef,
    ChunkStore,
    WriteStats,
)
from ckpt_agent.store.manifest import ImageEntry, PageTable, Slices, SliceTable, check_loaded_slices

try:
    import xxhash
except ImportError:  # without the optional wheel: no page tables, incrementals at chunk granularity as before
    xxhash = None
# hashlib is no substitute: blake2b-128 page by page runs at ~0.3 GB/s, sha256 at ~0.8 GB/s on the 2-vCPU dev VM,
# which would add seconds per GiB to every full checkpoint; xxh3-128 runs at ~10 GB/s
PAGE_HASH = "xxh3_128" if xxhash is not None else None


def page_hash(page) -> bytes:
    return xxhash.xxh3_128_digest(page)


PAGE = os.sysconf("SC_PAGE_SIZE")  # what CRIU's pagemap counts in (4 KiB on x86; arm64 kernels may use 64 KiB)
_ENTRY = struct.Struct("<Q16s")  # one page table entry: vaddr, hash
MAX_DELTA_DEPTH = 8  # at most this many delta generations of an image between two full ones
MAX_CHANGED_SHARE = 0.5  # more changed than this: write the image in full (address-window chunks dedupe as well)
MAX_READ_AMPLIFICATION = 2.0  # restoring a delta image may read at most this many times its size


def hash_pages(buf, runs: Sequence[Tuple[int, int]]) -> Tuple[List[int], List[bytes]]:
    """(vaddr, hash) of every page of a pages image held in `buf`, in file order."""
    vaddrs: List[int] = []
    hashes: List[bytes] = []
    view = memoryview(buf)
    off = 0
    for vaddr, nr in runs:
        for k in range(nr):
            vaddrs.append(vaddr + k * PAGE)
            hashes.append(page_hash(view[off:off + PAGE]))
            off += PAGE
    return vaddrs, hashes


def hash_file(path: str, runs: Sequence[Tuple[int, int]]) -> Tuple[List[int], List[bytes]]:
    with open(path, "rb") as fh:
        if not os.fstat(fh.fileno()).st_size:
            return [], []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return hash_pages(buf, runs)


def store_bytes(chunks: ChunkStore, data: bytes, pool) -> Tuple[List[ChunkRef], WriteStats]:
    """data as CHUNK_BYTES chunks (the last shorter), written by the pool."""
    parts = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    total = WriteStats()
    refs = []
    for ref, st in pool.map(chunks.put, parts):
        refs.append(ref)
        total.add(st)
    return refs, total


HASH_BYTES = 16  # xxh3-128


def run_vaddrs(runs: Sequence[Tuple[int, int]]) -> array.array:
    """The virtual address of every page of pagemap runs [(first vaddr, pages)], in file order, 8 bytes each."""
    out = array.array("Q")
    for vaddr, nr in runs:
        out.extend(range(vaddr, vaddr + nr * PAGE, PAGE))
    return out


def pack_table(vaddrs: Sequence[int], packed_hashes: bytes) -> bytes:
    """The page table's bytes, one _ENTRY (vaddr, hash) a page: interleaved by strided copies where the machine is
    little-endian (a struct.pack a page took 0.15 s per GiB of memory, this 0.02 s)."""
    n = len(vaddrs)
    if len(packed_hashes) != n * HASH_BYTES:
        raise ValueError(f"{n} pages but {len(packed_hashes)} bytes of hashes")
    if sys.byteorder != "little":
        return b"".join(_ENTRY.pack(v, packed_hashes[i * HASH_BYTES:(i + 1) * HASH_BYTES])
                        for i, v in enumerate(vaddrs))
    blob = bytearray(_ENTRY.size * n)
    words = memoryview(blob).cast("Q")  # 3 words an entry: vaddr, hash[:8], hash[8:]
    # (no copy of a bytearray's hashes first: a written-only final's come as one, and a big job's are GiBs)
    hashes = memoryview(packed_hashes if isinstance(packed_hashes, (bytes, bytearray)) else bytes(packed_hashes))
    hashes = hashes.cast("Q")
    words[0::3] = vaddrs if isinstance(vaddrs, array.array) else array.array("Q", vaddrs)
    words[1::3] = hashes[0::2]
    words[2::3] = hashes[1::2]
    words.release()
    hashes.release()
    return bytes(blob)


def store_table(chunks: ChunkStore, vaddrs: Sequence[int], hashes, pool) -> Tuple[PageTable, WriteStats]:
    """Store a page table: `vaddrs` (ints, or run_vaddrs' array) and the pages' hashes (a list of 16-byte hashes, or
    them packed into one bytes-like)."""
    packed = hashes if isinstance(hashes, (bytes, bytearray)) else b"".join(hashes)
    blob = pack_table(vaddrs, packed)
    refs, st = store_bytes(chunks, blob, pool)
    return PageTable(hash=PAGE_HASH, pages=len(vaddrs), chunks=refs), st


def sliced_entry(name: str, size: int, pieces: Iterable[Tuple[ChunkRef, int, int]]) -> ImageEntry:
    """The entry of an image made of these (chunk, offset, length) pieces, in file order: the chunks one after the
    other when each piece is a whole chunk (a full image: no slices), else each chunk once, in the order first used,
    and the slices over them (stored by store_slices)."""
    refs: List[ChunkRef] = []
    whole: Optional[List[ChunkRef]] = []
    index: Dict[str, int] = {}
    slices = Slices()
    extend = slices.words.extend
    for ref, off, length in pieces:
        if whole is not None:
            if off == 0 and length == ref.size:
                whole.append(ref)
            else:
                whole = None
        i = index.get(ref.digest)
        if i is None:
            i = index[ref.digest] = len(refs)
            refs.append(ref)
        extend((i, off, length))
    if whole is not None:
        return ImageEntry(name=name, size=size, chunks=whole)
    return ImageEntry(name=name, size=size, chunks=refs, slices=slices)


def store_slices(chunks: ChunkStore, entry: ImageEntry, pool) -> WriteStats:
    """Store a sliced entry's slices in chunks of their own (its slice table, manifest format 3); nothing for an
    entry without slices or whose table is stored already."""
    if entry.slices is None or entry.slice_table is not None:
        return WriteStats()
    refs, stats = store_bytes(chunks, entry.slices.to_bytes(), pool)
    entry.slice_table = SliceTable(count=len(entry.slices), chunks=refs)
    return stats


def load_slices(chunks: ChunkStore, images: Iterable[ImageEntry]) -> None:
    """Read the slices of every entry that has a slice table and whose slices are not in memory, checked against
    the entry (DamagedCheckpointError naming the image otherwise)."""
    for entry in images:
        if entry.slice_table is None or entry.slices is not None:
            continue
        where = f"image {entry.name}"
        blob = b"".join(chunks.get(r, f"{where} slice table") for r in entry.slice_table.chunks)
        try:
            slices = Slices.from_bytes(blob)
        except ValueError as e:
            raise DamagedCheckpointError(f"{where}: bad slice table: {e}") from e
        check_loaded_slices(entry, slices, where)
        entry.slices = slices


def _table_blob(chunks: ChunkStore, entry: ImageEntry, where: str) -> Optional[bytes]:
    table = entry.pagetable
    if PAGE_HASH is None or table is None or table.hash != PAGE_HASH:
        return None
    blob = b"".join(chunks.get(r, where) for r in table.chunks)
    if len(blob) != _ENTRY.size * table.pages:
        raise DamagedCheckpointError(f"{where}: page table does not match its page count")
    return blob


def load_table(chunks: ChunkStore, entry: ImageEntry, where: str) -> Optional[Dict[int, Tuple[bytes, int]]]:
    """vaddr -> (hash, offset in the image) from a stored image's page table; None when it has none we can use."""
    blob = _table_blob(chunks, entry, where)
    if blob is None:
        return None
    return {v: (h, i * PAGE) for i, (v, h) in enumerate(_ENTRY.iter_unpack(blob))}


def load_hashes(chunks: ChunkStore, entry: ImageEntry, where: str) -> Optional[List[bytes]]:
    """The hash of every page of a stored image, in file order (page i at offset i * PAGE); None as load_table."""
    blob = _table_blob(chunks, entry, where)
    if blob is None:
        return None
    step = _ENTRY.size
    return [blob[i + 8:i + step] for i in range(0, len(blob), step)]


def load_columns(chunks: ChunkStore, entry: ImageEntry, where: str) -> Optional[Tuple[array.array, bytes]]:
    """A stored image's page table as two columns: every page's vaddr (array "Q", ascending, in file order) and the
    pages' hashes packed HASH_BYTES each; None as load_table."""
    blob = _table_blob(chunks, entry, where)
    if blob is None:
        return None
    n = len(blob) // _ENTRY.size
    if sys.byteorder != "little":
        rows = [_ENTRY.unpack_from(blob, i * _ENTRY.size) for i in range(n)]
        return array.array("Q", (v for v, _ in rows)), b"".join(h for _, h in rows)
    # 3 words an entry: vaddr, hash[:8], hash[8:]. An array's extended slices are copied in C: the vaddrs are every
    # third word, and deleting them leaves the hashes packed in order (a memoryview's strided slice, iterated into
    # an array, took 45-60 ms a GiB of pages where this takes 3-4 ms; 2-vCPU Xeon VM, 2026-12-06)
    words = array.array("Q")
    words.frombytes(blob)
    del blob  # 24 bytes a page: a big job's table is GiBs
    vaddrs = words[0::3]
    del words[0::3]
    return vaddrs, words.tobytes()


def store_delta(
    chunks: ChunkStore,
    pool: concurrent.futures.Executor,
    path: str,
    runs: Sequence[Tuple[int, int]],
    previous: ImageEntry,
    where: str,
    verify: Optional[Callable[[str], bool]] = None,
) -> Tuple[Optional[ImageEntry], WriteStats]:
    """Store pages image `path` as changed pages plus slices of the chunks of `previous` (its manifest entry in the
    previous generation), under the previous entry's name. The entry is None when the compaction rule (or an
    unusable previous entry) asks for a full image; the stats then count only the reused chunks verified."""
    none = WriteStats()
    depth = (previous.delta_depth or 0) + 1
    if depth > MAX_DELTA_DEPTH:
        return None, none
    size = os.path.getsize(path)
    if size != sum(nr for _, nr in runs) * PAGE or size == 0:
        return None, none
    try:
        load_slices(chunks, [previous])
        prev_table = load_table(chunks, previous, where)
    except DamagedCheckpointError:
        return None, none
    if prev_table is None:
        return None, none
    prev_refs = previous.chunks
    prev_starts, prev_pieces = [], []
    pos = 0
    for piece in previous.pieces():
        prev_starts.append(pos)
        prev_pieces.append(piece)
        pos += piece[2]
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        vaddrs, hashes = hash_pages(buf, runs)
        # per page: where its bytes come from, ("old", chunk ref, offset) or ("new", index of the changed page)
        sources: List[Tuple[Any, int]] = []
        changed: List[int] = []
        for i, (v, h) in enumerate(zip(vaddrs, hashes)):
            old = prev_table.get(v)
            if old is not None and old[0] == h:
                k = bisect.bisect_right(prev_starts, old[1]) - 1
                idx, off, length = prev_pieces[k]
                inner = old[1] - prev_starts[k]
                if inner + PAGE <= length:
                    sources.append((prev_refs[idx], off + inner))
                    continue
            sources.append((None, len(changed)))
            changed.append(i)
        if len(changed) > MAX_CHANGED_SHARE * len(vaddrs):
            return None, none
        view = memoryview(buf)
        new_data = b"".join(view[i * PAGE:(i + 1) * PAGE] for i in changed)
        del view
    # the reused chunks and how much a restore would read
    reused = {ref.digest: ref for ref, _ in sources if ref is not None}
    per_new = CHUNK_BYTES // PAGE
    if sum(r.size for r in reused.values()) + len(new_data) > MAX_READ_AMPLIFICATION * size:
        return None, none
    if verify is not None:
        due = [r for d, r in reused.items() if verify(d)]
        bad = chunks.rotten(due, pool, where)
        none.chunks_verified = len(due)
        if bad:  # a rotten chunk is never referenced again: the image is written in full, which repairs it
            chunks.unclaim(bad)
            return None, none
    new_refs, stats = store_bytes(chunks, new_data, pool)
    stats.bytes_in = size
    stats.chunks_reused += len(reused)
    stats.chunks_verified += none.chunks_verified
    table, tstats = store_table(chunks, vaddrs, hashes, pool)
    stats.add(tstats)
    pieces: List[list] = []  # [ref, offset, length], adjacent runs of one chunk merged
    for ref, off in sources:
        if ref is None:
            ref, off = new_refs[off // per_new], (off % per_new) * PAGE
        last = pieces[-1] if pieces else None
        if last is not None and last[0].digest == ref.digest and last[1] + last[2] == off:
            last[2] += PAGE
        else:
            pieces.append([ref, off, PAGE])
    entry = sliced_entry(previous.name, size, pieces)
    entry.pagetable, entry.delta_depth = table, depth
    stats.add(store_slices(chunks, entry, pool))
    return entry, stats
