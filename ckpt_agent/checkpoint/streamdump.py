"""Checkpoint and restore through CRIU's image streamer (`--stream`): no full staging copy of the images.

Dump: CRIU writes each image into a pipe (store/imgstream.py) and the images enter the chunk store as they arrive,
so the dump overlaps with hashing and writing, and the extra memory a checkpoint needs is a few chunks per open
image (MAX_INFLIGHT_CHUNKS, plus the page-hash tables), not the job's size. The images directory only holds
CRIU's log, its stats files and the sockets.

Pages images arrive before their pagemap (CRIU writes pagemap-N.img and pages-N.img side by side and closes the
pagemap last), so incrementals here are by content, not by address:
  1. while CRIU freezes and collects the tree, a map page hash -> (chunk, offset) is built from the previous
     generation's page tables (every pages image of it), after checking the chunks the policy picks (chunks.py;
     rotten ones are left out); a pages image waits for it;
  2. while pages stream in, the pages of each read are hashed (xxh3-128); runs of pages found in the map become
     slices of the old chunks, the others are packed into new 1 MiB chunks, written while the dump goes on;
  3. once CRIU is done, the pagemap gives the pages' addresses and the (vaddr, hash) page table is stored, as on
     the staged path (store/pagedelta.py), for the next generation.
Compaction follows pagedelta's rules where they can be applied to a stream: after MAX_DELTA_DEPTH generations that
reuse old pages, the next stores all pages anew; a generation whose restore would read more than
MAX_READ_AMPLIFICATION times its size marks itself so that the next one is stored anew. Every chunk is still named
and checked by its digest on restore.

Restore: the images are served from verified chunks through the serve socket, read ahead by the chunk workers
(StoreSource); none is written to the images directory, which holds the socket and CRIU's log. CRIU checks this
machine's CPU against cpuinfo.img before it restores anything (adapters/criu.py: IncompatibleCpuError).
"""

from __future__ import annotations

import array
import bisect
import concurrent.futures
import ctypes
import itertools
import logging
import os
import re
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from ckpt_agent.adapters.criu import CORE_IMAGE, PagemapReader, pagemap_pages_id, pages_runs_from
from ckpt_agent.checkpoint import zeropages
from ckpt_agent.errors import DamagedCheckpointError, StoreError
from ckpt_agent.node.fields import STREAM_MODES
from ckpt_agent.store import imgstream, pagedelta
from ckpt_agent.store.chunks import CHUNK_BYTES, WORKERS, ChunkRef, ChunkStore, ReadBuffers, WriteStats
from ckpt_agent.store.manifest import ImageEntry, Manifest, Slices

log = logging.getLogger(__name__)

MAX_INFLIGHT_CHUNKS = 8  # chunks handed to the pool and not yet stored, per checkpoint: bounds RAM to ~8 MiB
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3)
# glibc's mmap threshold moves (up to 32 MiB) whenever an mmap'ed buffer is freed. Fixed here, above the 1 MiB chunk
# buffers: they come from the heap and freed ones are reused, where mmap'ing each (a threshold below 1 MiB) cost a
# page fault per 4 KiB and a TLB shootdown per buffer, which more than doubled the time a streamed dump takes on 2
# vCPUs; the trim threshold returns freed memory at the top of the heap, so the checkpointer's RSS stays near the
# buffers in flight (bench/memory_bench.py measures it)
MMAP_THRESHOLD_BYTES = 8 << 20
TRIM_THRESHOLD_BYTES = 4 << 20


def _pin_mmap_threshold() -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: only the RSS bound is looser
        pass


class _Putter:
    """Hand chunks to the pool with at most MAX_INFLIGHT_CHUNKS waiting; collect refs and stats."""

    def __init__(self, chunks: ChunkStore, pool: concurrent.futures.Executor):
        self.chunks = chunks
        self.pool = pool
        self.slots = threading.BoundedSemaphore(MAX_INFLIGHT_CHUNKS)
        self.stats = WriteStats()
        self._lock = threading.Lock()

    def submit(self, data: bytes) -> concurrent.futures.Future:
        self.slots.acquire()
        try:
            fut = self.pool.submit(self.chunks.put, data)
        except BaseException:
            self.slots.release()
            raise
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: concurrent.futures.Future) -> None:
        self.slots.release()
        if not fut.cancelled() and fut.exception() is None:
            with self._lock:
                self.stats.add(fut.result()[1])


class FileSink:
    """Any image but pages: cut into CHUNK_BYTES chunks as it arrives (pagemaps are kept too, they are small)."""

    def __init__(self, name: str, putter: _Putter, keep: bool = False, store: bool = True,
                 reader: Optional[PagemapReader] = None):
        self.name = name
        self.putter = putter
        self.buf = bytearray()
        self.futures: List[concurrent.futures.Future] = []
        self.size = 0
        self.kept = bytearray() if keep or not store else None
        self.store = store  # False: only kept, stored by StreamDump.finish (a written-only dump's pagemaps)
        self.reader = reader  # a pagemap's entries, read while CRIU dumps: ready when it ends

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.kept is not None:
            self.kept += data
        if self.reader is not None:
            self.reader.feed(data)
        if not self.store:
            return
        if not self.buf and len(data) == CHUNK_BYTES:  # a whole block (imgstream.read_block): no copy
            self.futures.append(self.putter.submit(data))
            return
        self.buf += data
        while len(self.buf) >= CHUNK_BYTES:
            self.futures.append(self.putter.submit(bytes(self.buf[:CHUNK_BYTES])))
            del self.buf[:CHUNK_BYTES]

    def close(self) -> None:
        if self.buf and self.store:
            self.futures.append(self.putter.submit(bytes(self.buf)))
            self.buf = bytearray()

    def entry(self) -> ImageEntry:
        return ImageEntry(name=self.name, size=self.size, chunks=[f.result()[0] for f in self.futures])


class PagesSink:
    """A pages-N.img: hashed page by page; pages found in `reuse` become slices of old chunks, the rest new chunks.

    Work is done per read, not per page where it can be: the pages of a read are hashed in one pass, and a run of
    pages not found in `reuse` (all of them in a full checkpoint) is copied into the new chunk as one piece."""

    def __init__(self, name: str, putter: _Putter, reuse: ReuseMap):
        self.name = name
        self.putter = putter
        self.reuse = reuse
        self.buf = bytearray()
        self.new = bytearray()
        self.futures: List[concurrent.futures.Future] = []
        self.hashes = bytearray()  # 16 bytes a page, packed: a list of bytes objects would cost 57
        # [key, offset, length]; key: the ChunkRef of an old chunk, or k (an int) for the k-th new chunk
        self.slices: List[list] = []
        self.size = 0
        self.reused_bytes = 0

    def _slice(self, key, off: int, length: int) -> None:
        last = self.slices[-1] if self.slices else None
        if last is not None and (last[0] is key or last[0] == key) and last[1] + last[2] == off:
            last[2] += length
        else:
            self.slices.append([key, off, length])

    def _new_run(self, data) -> None:
        """Pages to store anew, cut at chunk boundaries."""
        while data:
            room = CHUNK_BYTES - len(self.new)
            if room <= 0:
                self._flush_new()
                continue
            piece, data = data[:room], data[room:]
            self._slice(len(self.futures), len(self.new), len(piece))
            self.new += piece

    def _flush_new(self) -> None:
        if self.new:
            self.futures.append(self.putter.submit(bytes(self.new)))
            self.new = bytearray()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        page = pagedelta.PAGE
        if self.buf:  # a page split across two reads
            data = bytes(self.buf) + data
            self.buf = bytearray()
        whole = len(data) - len(data) % page
        if whole < len(data):
            self.buf += data[whole:]
        view = memoryview(data)
        hashes = [pagedelta.page_hash(view[off:off + page]) for off in range(0, whole, page)]
        self.hashes += b"".join(hashes)
        reuse = self.reuse
        if not reuse or not any(h in reuse.where for h in hashes):
            if not self.new and whole == len(data) == CHUNK_BYTES:  # a whole new chunk as read: no copy
                self._slice(len(self.futures), 0, CHUNK_BYTES)
                self.futures.append(self.putter.submit(data))
            else:
                self._new_run(view[:whole])
            return
        refs, bits = reuse.refs, ReuseMap.OFFSET_BITS
        mask = (1 << bits) - 1
        found = list(map(reuse.where.get, hashes))
        i, n = 0, len(found)
        while i < n:  # runs of new pages, and runs of pages lying one after the other in an old chunk
            v = found[i]
            j = i + 1
            if v is None:
                while j < n and found[j] is None:
                    j += 1
                self._new_run(view[i * page:j * page])
            else:
                nxt = v + page
                while j < n and found[j] == nxt:
                    j += 1
                    nxt += page
                self._slice(refs[v >> bits], v & mask, (j - i) * page)
                self.reused_bytes += (j - i) * page
            i = j

    def close(self) -> None:
        if self.buf:  # never for a CRIU pages image (whole pages only); kept as data all the same
            self.hashes = bytearray()  # no page table for a file that is not whole pages
            self._new_run(memoryview(bytes(self.buf)))
            self.buf = bytearray()
        self._flush_new()

    def entry(self, runs, depth: int) -> Tuple[ImageEntry, Optional[Tuple[Any, bytearray]]]:
        """The image's manifest entry, and its page table to store (None when the pagemap does not match)."""
        new_refs = [f.result()[0] for f in self.futures]
        entry = pagedelta.sliced_entry(self.name, self.size, ((key if isinstance(key, ChunkRef) else new_refs[key],
                                                               off, length) for key, off, length in self.slices))
        _mark_depth(entry, new_refs, depth)
        npages = len(self.hashes) // pagedelta.HASH_BYTES
        if runs is not None and npages and sum(n for _, n in runs) == npages:
            return entry, (pagedelta.run_vaddrs(runs), self.hashes)  # stored by StreamDump.finish
        return entry, None


    def entry_with_parents(self, entries: Sequence[Tuple[int, int, bool]], parent: ParentImage, depth: int,
                           dropped: Set[str]) -> Tuple[ImageEntry, Tuple[Any, Any]]:
        """The entry of a written-only dump's pages image (CRIU patch 0002): `entries` (the pagemap's, in order)
        interleave the pages CRIU sent (in this sink) with PE_PARENT holes, pages unchanged since the previous
        generation, taken from its image by address. The stored image holds every page, as a full dump's does, and
        so does its page table. ParentPagesMissing when a hole is not in the previous image or lies in a rotten
        chunk (the caller dumps again without holes).

        One walk of the entries: each is first expected where the previous one ended in the previous image's
        pages (true of nearly every entry: a written-only final of a big job holds a run per scattered write, and
        the tool mapped or unmapped little since), and looked up by address (ParentImage.runs) only when it is not
        there. A final of 500 GiB after a 5% change holds some 13 million entries, so the walk has a short path
        for the usual entry: a hole within one piece of the previous image (found from the piece the last one was
        in, by bisection only when it is not that one), or pages CRIU sent within one piece of this sink's."""
        new_refs = [f.result()[0] for f in self.futures]
        streamed = [(key if isinstance(key, ChunkRef) else new_refs[key], off, length)
                    for key, off, length in self.slices]
        page, hb = pagedelta.PAGE, pagedelta.HASH_BYTES
        pv, total = parent.vaddrs, len(parent.vaddrs)
        prefs, starts = parent.entry.chunks, parent.starts
        p_chunk, p_off, p_len = parent.piece_chunk, parent.piece_off, parent.piece_len  # its pieces, as columns
        n_pieces = len(p_len)
        phashes, mine = parent.hashes, self.hashes
        # The new image's pieces, made as pagedelta.sliced_entry makes them (each chunk listed once, in the order
        # first used; a piece that follows on from the last in the same chunk extends it), as flat words: three a
        # piece (index in refs, offset, length).
        refs: List[ChunkRef] = []
        index: Dict[str, int] = {}  # digest -> its index in refs
        p_index = [-1] * len(prefs)  # the previous image's chunk k -> its index in refs (-1: not used yet)
        pieces = Slices()
        pw = pieces.words
        last_j = last_end = -1  # the last piece's index in refs, and where it ends in that chunk
        # The pages' hashes: while every entry lies where the last one ended in the previous image's pages, from its
        # first on (the usual), the previous image's hashes with those of the pages CRIU sent written over them
        # (`table`: nothing to do for a hole); from the first entry that does not, a slice an entry in `parts`.
        table: Optional[bytearray] = bytearray(phashes)
        parts: List[Any] = []
        part = parts.append
        zero: Optional[ChunkRef] = None  # a chunk of zeros, for pages that were not there (ParentImage)
        guess = 0  # where in the previous image's pages the next entry is expected
        # the pages' vaddrs as segments: (True, a, b) the previous image's pages a..b-1, (False, vaddr, pages); the
        # last run of the previous image's pages is kept in run_a..run_b (run_b < 0: none) until another begins
        segments: List[tuple] = []
        run_a = run_b = -1
        parent_bytes = npages = 0
        # the previous image's piece k, from byte ks to ke of its pages (k = -1: none yet)
        k, ks, ke = -1, 0, 0
        # this sink's streamed piece si (its chunk's index in refs, its offset, its length), `used` bytes of it used
        # (s_j: -1 until the piece is first used, as chunks are listed in the order first used)
        si, used, n_streamed, hpos = -1, 0, len(streamed), 0
        s_ref: Optional[ChunkRef] = None
        s_j = s_off = s_len = 0

        def ref_index(ref: ChunkRef) -> int:
            j = index.get(ref.digest)
            if j is None:
                j = index[ref.digest] = len(refs)
                refs.append(ref)
            return j

        def parent_index(c: int, vaddr: int) -> int:
            ref = prefs[c]
            if dropped and ref.digest in dropped:
                raise ParentPagesMissing(f"{self.name}: pages at {vaddr:#x} lie in rotten chunk {ref.digest}")
            j = p_index[c] = ref_index(ref)
            return j

        def emit(j: int, off: int, n: int) -> None:
            nonlocal last_j, last_end
            if j == last_j and off == last_end:
                pw[-1] += n
            else:
                pw.extend((j, off, n))
                last_j = j
            last_end = off + n

        def from_parent(b: int, n: int, vaddr: int) -> None:
            """n bytes of the previous image's pages from its byte b, piece by piece."""
            nonlocal k, ks, ke
            while n:
                if not ks <= b < ke:
                    if b == ke and k + 1 < n_pieces:
                        k += 1
                    else:
                        k = bisect.bisect_right(starts, b) - 1
                    ks = starts[k]
                    ke = ks + p_len[k]
                step = min(ke - b, n)
                c = p_chunk[k]
                emit(p_index[c] if p_index[c] >= 0 else parent_index(c, vaddr), p_off[k] + b - ks, step)
                b += step
                n -= step

        def next_streamed() -> None:
            nonlocal si, used, s_ref, s_j, s_off, s_len
            si, used, s_j = si + 1, 0, -1
            if si < n_streamed:
                s_ref, s_off, s_len = streamed[si]
            else:  # none left: the next entry of sent pages fails in from_streamed
                s_off = s_len = 0

        def from_streamed(n: int) -> None:
            """The next n bytes CRIU sent, piece by piece."""
            nonlocal used, s_j
            while n:
                if si >= n_streamed:
                    raise ParentPagesMissing(f"{self.name}: the pagemap names more pages than CRIU sent")
                if s_j < 0:
                    s_j = ref_index(s_ref)
                step = min(s_len - used, n)
                emit(s_j, s_off + used, step)
                used += step
                n -= step
                if used == s_len:
                    next_streamed()

        next_streamed()
        for vaddr, nr, in_parent in entries:
            end = guess + nr
            n = nr * page
            # (pv ascends by at least a page: first and last equal means every page is there)
            here = end <= total and pv[guess] == vaddr and pv[end - 1] == vaddr + n - page
            if here:
                if run_b != guess:
                    if run_b >= 0:
                        segments.append((True, run_a, run_b))
                    run_a = guess
                run_b = end
            else:
                if table is not None:  # the hashes so far (pages 0..guess-1 of the previous image), in parts now
                    part(table[:guess * hb])
                    table = None
                if run_b >= 0:
                    segments.append((True, run_a, run_b))
                    run_b = -1
                segments.append((False, vaddr, nr))
            if not in_parent:  # pages CRIU sent
                if table is not None:
                    table[guess * hb:end * hb] = mine[hpos:hpos + nr * hb]
                else:
                    part(mine[hpos:hpos + nr * hb])
                hpos += nr * hb
                if used + n < s_len and s_j >= 0:  # the usual: within the streamed piece, which it does not finish
                    emit(s_j, s_off + used, n)
                    used += n
                else:
                    from_streamed(n)
            elif here:  # a hole where the last entry ended
                b = guess * page
                if table is None:
                    part(phashes[guess * hb:end * hb])
                if ks <= b and b + n <= ke:  # the usual: within the piece the last hole was in
                    c = p_chunk[k]
                    j = p_index[c]
                    if j < 0:
                        j = parent_index(c, vaddr)
                    emit(j, p_off[k] + b - ks, n)
                else:
                    from_parent(b, n, vaddr)
                parent_bytes += n
            else:  # a hole elsewhere: looked up by address
                for i, m in parent.runs(vaddr, nr):
                    if i == ParentImage.ZERO:
                        zero = zero or self.putter.chunks.put(bytes(CHUNK_BYTES))[0]
                        for z in range(0, m * page, CHUNK_BYTES):
                            emit(ref_index(zero), 0, min(CHUNK_BYTES, m * page - z))
                        part(pagedelta.page_hash(bytes(page)) * m)
                    else:
                        part(phashes[i * hb:(i + m) * hb])
                        from_parent(i * page, m * page, vaddr)
                parent_bytes += n
            guess = end if here else bisect.bisect_right(pv, vaddr + n - page)
            npages += nr
        if run_b >= 0:
            segments.append((True, run_a, run_b))
        if si < n_streamed or hpos != len(mine):
            raise ParentPagesMissing(f"{self.name}: CRIU sent pages the pagemap does not name")
        if len(segments) == 1 and segments[0] == (True, 0, total):
            vaddrs = pv  # the same pages as the previous image
        else:
            vaddrs = array.array("Q")
            for known, a, b in segments:
                vaddrs.extend(pv[a:b] if known else range(a, a + b * page, page))
        if all(pw[j + 1] == 0 and pw[j + 2] == refs[pw[j]].size for j in range(0, len(pw), 3)):
            # every piece a whole chunk (a full image: no slices), as sliced_entry makes it
            entry = ImageEntry(name=self.name, size=npages * page, chunks=[refs[i] for i in pw[::3]])
        else:
            entry = ImageEntry(name=self.name, size=npages * page, chunks=refs, slices=pieces)
        _mark_depth(entry, new_refs, depth)
        self.reused_bytes += parent_bytes
        if table is None:
            hashes: Any = b"".join(parts)
        else:
            hashes = table if npages == total else table[:npages * hb]
        return entry, (vaddrs, hashes)


def _mark_depth(entry: ImageEntry, new_refs: List[ChunkRef], depth: int) -> None:
    """A pages image that reuses chunks of older generations is a delta of `depth`; one whose restore would read
    more than MAX_READ_AMPLIFICATION times its size makes the next generation store the image anew."""
    fresh = {r.digest for r in new_refs}
    old = {r.digest: r.size for r in entry.chunks if r.digest not in fresh}
    if old:
        new_bytes = sum(r.size for r in new_refs)
        too_costly = sum(old.values()) + new_bytes > pagedelta.MAX_READ_AMPLIFICATION * entry.size
        entry.delta_depth = pagedelta.MAX_DELTA_DEPTH if too_costly else depth


class ParentPagesMissing(StoreError):
    """A written-only dump named pages as unchanged that the previous generation cannot give back."""


class ParentImage:
    """One process's pages image in the previous generation, looked up by address: its page table's columns
    (vaddrs ascending, hashes) and where its bytes lie (the image's pieces).

    A hole CRIU names may also cover pages the previous image does not hold. With userfaultfd write-protection in
    async mode the kernel always applies WP_UNPOPULATED (fs/userfaultfd.c), so the protection leaves markers on
    page-table entries that had no page, and pagemap reports them as swapped pages that were not written since:
    pages that were not there (no page, so zero) when the previous dump was taken, and were not written since. They
    are zero pages (ZERO)."""

    ZERO = -1  # a run of zero pages, in runs()

    def __init__(self, entry: ImageEntry, vaddrs: array.array, hashes: bytes):
        self.entry = entry
        self.vaddrs = vaddrs
        self.hashes = hashes
        pieces = entry.pieces()
        # the pieces as columns (chunk index, offset in it, length), and the byte offset where each begins
        words = (pieces.words if isinstance(pieces, Slices)
                 else array.array("Q", itertools.chain.from_iterable(pieces)))
        self.piece_chunk, self.piece_off, self.piece_len = words[0::3], words[1::3], words[2::3]
        lengths = self.piece_len
        self.starts = array.array("Q", itertools.accumulate(lengths[:-1], initial=0) if lengths else ())
        self.size = sum(lengths)
        if len(vaddrs) * pagedelta.PAGE != self.size or len(hashes) != len(vaddrs) * pagedelta.HASH_BYTES:
            raise ParentPagesMissing(f"{entry.name}: its page table does not match the image")

    def runs(self, vaddr: int, nr: int) -> List[Tuple[int, int]]:
        """The nr pages from vaddr as runs (index of the first in the previous image, or ZERO; pages)."""
        v, page = self.vaddrs, pagedelta.PAGE
        out = []
        k = 0
        while k < nr:
            va = vaddr + k * page
            i = bisect.bisect_left(v, va)
            left = nr - k
            if i < len(v) and v[i] == va:
                # v ascends by at least a page: v[i + j] == va + j * page holds for a prefix of j, found by bisection
                lo, hi = 1, min(left, len(v) - i)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if v[i + mid - 1] == va + (mid - 1) * page:
                        lo = mid
                    else:
                        hi = mid - 1
                out.append((i, lo))
                k += lo
            else:
                n = left if i >= len(v) else min(left, (v[i] - va) // page)
                out.append((self.ZERO, n))
                k += n
        return out


_PAGEMAP_NAME = re.compile(r"pagemap-(\d+)\.img$")  # a task's (pagemap-shmem-N.img never holds PE_PARENT holes)


def parents_usable(previous: Optional[Manifest]) -> bool:
    """Whether a written-only dump may name pages as unchanged since `previous`: each of its pages images has a page
    table of this hash and the compaction rule lets the next generation be a delta again."""
    if previous is None or pagedelta.PAGE_HASH is None:
        return False
    pages = [i for i in previous.images if i.name.startswith("pages-")]
    if not pages or any(i.pagetable is None or i.pagetable.hash != pagedelta.PAGE_HASH for i in pages):
        return False
    return 1 + max(i.delta_depth or 0 for i in pages) <= pagedelta.MAX_DELTA_DEPTH


def whole_image(chunks: ChunkStore, img: ImageEntry) -> bytes:
    """A small image's bytes (a pagemap, an mm image), read whole from its verified chunks, piece by piece: such an
    image is stored as whole chunks (only pages images become slices of older chunks, pagedelta.sliced_entry), and
    one that were not would still read right (its slices loaded first: ImageEntry.pieces)."""
    data: Dict[int, bytes] = {}
    out = bytearray()
    for idx, off, length in img.pieces():
        if idx not in data:
            data[idx] = chunks.get(img.chunks[idx], f"image {img.name}")
        out += memoryview(data[idx])[off:off + length]
    return bytes(out)


def parent_images(chunks: ChunkStore, previous: Manifest) -> Dict[str, ParentImage]:
    """pagemap image name (pagemap-<pid>.img, one a task) -> that task's pages image in `previous`."""
    by_name = {i.name: i for i in previous.images}
    out: Dict[str, ParentImage] = {}
    for name, img in by_name.items():
        if not _PAGEMAP_NAME.match(name):
            continue
        blob = whole_image(chunks, img)
        try:
            pages_id = pagemap_pages_id(blob)
        except ValueError as e:
            raise DamagedCheckpointError(f"image {name} of the previous generation: {e}") from e
        pages = by_name.get(f"pages-{pages_id}.img")
        if pages is None:
            continue
        pagedelta.load_slices(chunks, [pages])
        columns = pagedelta.load_columns(chunks, pages, f"image {pages.name}")
        if columns is not None:
            out[name] = ParentImage(pages, *columns)
    return out


class ReuseMap:
    """page hash -> where a chunk of the previous generation holds that page. One int a page (the chunk's number in
    `refs` << OFFSET_BITS | the offset in it), about 110 bytes a page with the key; a (chunk, offset) tuple a page
    cost about 180."""

    OFFSET_BITS = 32

    def __init__(self) -> None:
        self.where: Dict[bytes, int] = {}
        self.refs: List[ChunkRef] = []
        self._numbers: Dict[str, int] = {}
        self.dropped: Set[str] = set()  # chunks found rotten: nothing may be taken from them

    def __bool__(self) -> bool:
        return bool(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, page_hash: bytes) -> bool:
        return page_hash in self.where

    def get(self, page_hash: bytes) -> Optional[Tuple[ChunkRef, int]]:
        v = self.where.get(page_hash)
        if v is None:
            return None
        return self.refs[v >> self.OFFSET_BITS], v & ((1 << self.OFFSET_BITS) - 1)

    def number(self, ref: ChunkRef) -> int:
        k = self._numbers.get(ref.digest)
        if k is None:
            k = self._numbers[ref.digest] = len(self.refs)
            self.refs.append(ref)
        return k

    def add_pages(self, hashes: List[bytes], ref: ChunkRef, off: int) -> None:
        """The pages with these hashes, one after the other in `ref` from offset `off`."""
        base = (self.number(ref) << self.OFFSET_BITS) + off
        self.where.update(zip(hashes, range(base, base + len(hashes) * pagedelta.PAGE, pagedelta.PAGE)))

    def drop(self, digests: Set[str]) -> None:
        """Forget every page held by these chunks."""
        self.dropped |= set(digests)
        gone = {self._numbers[d] for d in digests if d in self._numbers}
        if gone:
            self.where = {h: v for h, v in self.where.items() if v >> self.OFFSET_BITS not in gone}


def reuse_map(chunks: ChunkStore, pool, previous: Optional[Manifest],
              content: bool = True) -> Tuple[ReuseMap, int, WriteStats]:
    """Where each page of every pages image of the previous generation is, by its hash, and the delta depth the new
    generation will have. Empty (a full generation) without page tables or once MAX_DELTA_DEPTH is reached. Chunks
    due for checking are checked first (ChunkStore.intact); a rotten one is left out (its pages are stored anew,
    repairing it). content=False (a written-only dump, whose unchanged pages come as holes): no map by hash, only
    the checks, whose rotten chunks are then in `dropped`."""
    stats = WriteStats()
    out = ReuseMap()
    images = [i for i in (previous.images if previous else []) if i.name.startswith("pages-")]
    depth = 1 + max([i.delta_depth or 0 for i in images] or [0])
    if pagedelta.PAGE_HASH is None or not images or depth > pagedelta.MAX_DELTA_DEPTH:
        return out, 0, stats
    page = pagedelta.PAGE
    for img in images if not content else []:
        for ref in img.chunks:
            out.number(ref)
    for img in images if content else []:
        try:
            pagedelta.load_slices(chunks, [img])
            hashes = pagedelta.load_hashes(chunks, img, f"image {img.name}")
        except DamagedCheckpointError:
            continue
        if hashes is None:
            continue
        refs = img.chunks
        pos = 0
        for idx, off, length in img.pieces():
            first = -(-pos // page)  # the pages wholly inside this piece
            end = min((pos + length) // page, len(hashes))
            if idx < len(refs) and end > first:
                out.add_pages(hashes[first:end], refs[idx], off + first * page - pos)
            pos += length
    due = {ref.digest: ref for ref in out.refs if chunks.claim_verification(ref.digest)}
    bad = chunks.rotten(due.values(), pool, "previous pages")
    stats.chunks_verified = len(due)
    if bad:
        chunks.unclaim(bad)
        out.drop(bad)
    return out, depth, stats


class StreamDump:
    """One streamed dump into the store: start() before `criu dump --stream -D images_dir`, finish() after it
    returned (the images' manifest entries and stats), abort() when it failed."""

    def __init__(self, chunks: ChunkStore, pool, images_dir: str, previous: Optional[Manifest] = None,
                 written_only: bool = False, compare_written: bool = False):
        self.chunks = chunks
        self.pool = pool
        # CRIU dumps with patch 0002 on: pages unchanged since `previous` come as PE_PARENT holes in the pagemaps
        self.written_only = written_only and previous is not None
        # and the pages it sends are still looked up by content in `previous` (soft-dirty marks a whole transparent
        # huge page written at a write to any of its 512 pages: adapters/softdirty.py)
        self.compare_written = compare_written
        self.parents: Dict[str, ParentImage] = {}
        self._parents_error: Optional[ParentPagesMissing] = None
        self.pages_unchanged = 0  # pages CRIU sent as holes (written-only), taken from `previous`
        _pin_mmap_threshold()
        self._t0 = time.monotonic()
        self._times: Dict[str, float] = {}  # where a streamed dump's time goes (debug log)
        self._drained = False
        self.reuse, self.depth, self._verify_stats = ReuseMap(), 0, WriteStats()
        self._reuse_error: Optional[BaseException] = None
        # the previous generation's pages are looked up (and their chunks checked) while CRIU freezes the tree and
        # collects it, before the first page arrives: a pages image waits for the map, nothing else does
        self._reuse_thread = threading.Thread(target=self._build_reuse, args=(previous,), name="reuse-map",
                                              daemon=True)
        self._reuse_thread.start()
        self.putter = _Putter(chunks, pool)
        self.sinks: Dict[str, Any] = {}
        self._lock = threading.Lock()
        try:
            self.server = imgstream.CaptureServer(images_dir, self._open)
        except BaseException:
            self._reuse_thread.join()
            raise

    def _build_reuse(self, previous: Optional[Manifest]) -> None:
        try:
            self.reuse, self.depth, self._verify_stats = reuse_map(self.chunks, self.pool, previous,
                                                                   content=self.compare_written or
                                                                   not self.written_only)
            if self.written_only:
                try:
                    self.parents = parent_images(self.chunks, previous)
                except DamagedCheckpointError as e:  # raised by finish() if CRIU sends holes, not in the stream
                    self._parents_error = ParentPagesMissing(str(e))
        except BaseException as e:  # noqa: BLE001 - raised where the map is needed, and by finish()
            self._reuse_error = e
        self._times["reuse_map"] = time.monotonic() - self._t0

    def _reuse(self) -> ReuseMap:
        self._reuse_thread.join()
        if self._reuse_error is not None:
            raise self._reuse_error
        return self.reuse

    def _open(self, name: str):
        if name in self.sinks:
            raise imgstream.StreamError(f"CRIU sent image {name} twice")
        if name.startswith("pages-"):
            sink = PagesSink(name, self.putter, self._reuse())
        else:
            pagemap = name.startswith("pagemap-")
            task_pagemap = self.written_only and _PAGEMAP_NAME.match(name) is not None
            # pagemaps and core images (a few KiB a thread: the engine reads which processes CRIU found stopped)
            # are kept as well as stored
            keep = pagemap or CORE_IMAGE.match(name) is not None
            sink = FileSink(name, self.putter, keep=keep, store=not (pagemap and self.written_only),
                            reader=PagemapReader() if task_pagemap else None)
        with self._lock:
            self.sinks[name] = sink
        return sink

    def _read_pagemaps(self) -> Dict[str, Tuple[str, List[Tuple[int, int, bool]]]]:
        """pages image name -> (its pagemap's name, the pagemap's entries), for the tasks' pagemaps (read while CRIU
        sent them)."""
        out = {}
        for name, sink in list(self.sinks.items()):
            if not isinstance(sink, FileSink) or sink.reader is None:
                continue
            try:
                pages_id, entries = sink.reader.result()
            except ValueError as e:
                if self.written_only:
                    raise ParentPagesMissing(f"{name}: {e}") from e
                continue  # only deduplication is lost: pages_runs_from() says so for this one
            out[f"pages-{pages_id}.img"] = (name, entries)
        return out

    def start(self) -> StreamDump:
        self.server.start()
        return self

    def abort(self) -> Optional[BaseException]:
        """After CRIU failed: stop serving, let queued chunk writes end (before the partial is removed), and return
        the store's error when one made CRIU fail (CRIU itself then only says "Broken pipe"), else None."""
        self.server.abort()
        self._reuse_thread.join()
        if self._reuse_error is not None:
            self.server.errors.append(self._reuse_error)
        for e in self.server.errors[:1]:
            log.warning("image stream failed: %s", e)
        failed = [f.exception() for sink in list(self.sinks.values()) for f in sink.futures]
        store_errors = [e for e in self.server.errors + failed if isinstance(e, (OSError, StoreError))]
        return store_errors[0] if store_errors else None

    def checks(self) -> WriteStats:
        """The checks of the previous generation's chunks this dump made (ChunkStore.claim_verification claims each
        digest once a checkpoint): what a dump that is given up and redone still counts, since the redone one does
        not check those chunks again."""
        self._reuse_thread.join()
        return self._verify_stats

    def drain(self) -> None:
        """Wait until every pipe CRIU wrote is read to its end. CRIU moves pages by vmsplice(2), by reference: until
        they are read out of the pipes they may still be the tool's own pages, so the tool must not run before
        this returns. Raises what the stream or the reuse map hit. Done once; finish() calls it too."""
        if self._drained:
            return
        self._times["criu"] = time.monotonic() - self._t0
        self.server.finish()
        self._reuse()  # built, or its error raised, even when CRIU sent no pages image
        self._times["drained"] = time.monotonic() - self._t0
        self._drained = True

    def core_images(self) -> Dict[str, bytes]:
        """The dump's core-N.img images, after drain()."""
        return {n: bytes(s.kept) for n, s in list(self.sinks.items())
                if isinstance(s, FileSink) and s.kept is not None and CORE_IMAGE.match(n)}

    def finish(self) -> Tuple[List[ImageEntry], WriteStats]:
        self.drain()
        kept = {n: bytes(s.kept) for n, s in self.sinks.items()
                if isinstance(s, FileSink) and s.kept is not None and n.startswith("pagemap-")}
        pagemaps = list(kept.values())
        read = self._read_pagemaps()
        holes = {n: v for n, v in read.items() if any(parent for _, _, parent in v[1])} if self.written_only else {}
        filled = {pagemap for pagemap, _ in holes.values()}
        if holes and self._parents_error is not None:
            raise self._parents_error
        images = []
        stats = WriteStats()
        stats.add(self._verify_stats)
        for name in sorted(self.sinks):
            sink = self.sinks[name]
            if isinstance(sink, PagesSink) and name in holes:
                pagemap, entries = holes[name]
                if pagemap not in self.parents:
                    raise ParentPagesMissing(f"{name}: no page table of {pagemap} in the previous generation")
                t_holes = time.monotonic()
                entry, table = sink.entry_with_parents(entries, self.parents[pagemap], self.depth,
                                                       self.reuse.dropped)
                self._times["holes"] = self._times.get("holes", 0.0) + time.monotonic() - t_holes
                stats.chunks_reused += len({r.digest for r in entry.chunks} - {f.result()[0].digest
                                                                               for f in sink.futures})
                self.pages_unchanged += sum(nr for _, nr, parent in entries if parent)
                entry.pagetable, tst = pagedelta.store_table(self.chunks, *table, self.pool)
                stats.add(tst)
                stats.add(pagedelta.store_slices(self.chunks, entry, self.pool))
            elif isinstance(sink, PagesSink):
                runs = ([(vaddr, nr) for vaddr, nr, parent in read[name][1] if not parent] if name in read
                        else pages_runs_from(pagemaps, name))
                entry, table = sink.entry(runs, self.depth)
                reused = {r.digest for r in entry.chunks} - {f.result()[0].digest for f in sink.futures}
                stats.chunks_reused += len(reused)
                if table is not None:
                    entry.pagetable, tst = pagedelta.store_table(self.chunks, *table, self.pool)
                    stats.add(tst)
                stats.add(pagedelta.store_slices(self.chunks, entry, self.pool))
            elif not sink.store:  # a written-only dump's pagemap: stored with its holes filled
                data = sink.reader.without_parents(kept[name]) if name in filled else kept[name]
                refs, pst = pagedelta.store_bytes(self.chunks, data, self.pool)
                stats.add(pst)
                entry = ImageEntry(name=name, size=len(data), chunks=refs)
            else:
                entry = sink.entry()
            images.append(entry)
        stats.add(self.putter.stats)
        self._times["tables"] = time.monotonic() - self._t0
        log.debug("streamed dump: reuse map of %d pages %.2f s; CRIU done at %.2f s, pipes drained at %.2f s, page "
                  "tables stored at %.2f s (holes filled in %.2f s)", len(self.reuse), self._times["reuse_map"],
                  self._times["criu"], self._times["drained"], self._times["tables"], self._times.get("holes", 0.0))
        # put() counted the bytes it was handed; pages taken over from older chunks were looked at too
        stats.bytes_in += sum(s.reused_bytes for s in self.sinks.values() if isinstance(s, PagesSink))
        return images, stats


PREFETCH_CHUNKS = 8  # chunks read and verified ahead of the one CRIU is reading, per image being served
HELD_CHUNKS = 32  # at most this many chunks held for later slices of a delta (one evicted is read again if needed)
WRITE_BATCH_BYTES = 1 << 20  # pieces of an image written to CRIU's pipe together (one writev), the pipe's size


class StoreSource:
    """Images of one manifest, served from verified chunks (restore through the serve socket).

    The chunks of an image are read, decompressed and checked by the pool, up to PREFETCH_CHUNKS ahead of the one
    being written to CRIU's pipe, in the order the image's slices first need them: the store's reads and the digest
    work overlap each other and CRIU, as a staged restore's parallel chunk reads do. A chunk that later slices of a
    delta come back to is kept (up to HELD_CHUNKS) until its last use.

    A task's pagemap is served without the runs of zero pages that CRIU restores as zeros anyway, and its pages
    image without their bytes (zeropages.py): decided when CRIU asks for the pagemap, which it reads before it asks
    for the pages."""

    def __init__(self, chunks: ChunkStore, images: List[ImageEntry],
                 pool: Optional[concurrent.futures.Executor] = None, kept: Optional[Dict[str, bytes]] = None):
        self.chunks = chunks
        self.pool = pool
        self.images = {os.path.basename(i.name): i for i in images}
        self.kept = kept  # core images served go here too (which processes were stopped: engine.py)
        # every chunk is read once, cold on a new node: around the page cache, into buffers reused (get_direct)
        self.buffers = ReadBuffers()
        self.cuts: Dict[str, List[Tuple[int, int]]] = {}  # pages image -> byte ranges left out (zeropages.Plan)
        self.zero_pages = 0  # pages left out, all tasks

    def _task_pagemap(self, name: str, pid: str) -> bytes:
        """The pagemap image to serve for task `pid`: without its zero runs where zeropages finds any (recording the
        cut of its pages image first), else as stored."""
        pagemap = whole_image(self.chunks, self.images[name])
        mm = f"mm-{pid}.img"
        try:
            pages = f"pages-{pagemap_pages_id(pagemap)}.img"
            if pages not in self.images or mm not in self.images:
                return pagemap
            img = self.images[pages]
            spans = zeropages.zero_spans(img.pieces(), img.chunks)
            plan = zeropages.plan(pagemap, whole_image(self.chunks, self.images[mm]), spans) if spans else None
        except ValueError as e:
            log.debug("%s served as stored: %s", name, e)
            return pagemap
        if plan is None:
            return pagemap
        if pages not in self.cuts:  # (CRIU reads each pagemap once; the same plan again changes nothing)
            self.zero_pages += plan.pages
        self.cuts[pages] = plan.cut
        log.debug("%s: %d zero pages left out of %s", name, plan.pages, pages)
        return plan.pagemap

    def exists(self, name: str) -> bool:
        return name in self.images

    def _fetch(self, ref: ChunkRef, where: str):
        """A future of (the chunk's bytes, the ReadBuffers buffer holding them or None)."""
        if self.pool is None:
            return _Done(lambda: (self.chunks.get(ref, where), None))
        return self.pool.submit(self.chunks.get_direct, ref, where, self.buffers)

    def write_to(self, name: str, fd: int) -> None:
        task = _PAGEMAP_NAME.match(name)
        if task:
            imgstream.write_all(fd, self._task_pagemap(name, task.group(1)))
            return
        img = self.images[name]
        refs = img.chunks
        pieces = img.pieces()
        if name in self.cuts:
            pieces = zeropages.cut_pieces(pieces, self.cuts[name])
        where = f"image {name}"
        last_use: Dict[int, int] = {}
        for n, (idx, _off, _len) in enumerate(pieces):
            last_use[idx] = n
        order = list(dict.fromkeys(idx for idx, _o, _l in pieces))  # each chunk once, in first-use order
        rank = {idx: r for r, idx in enumerate(order)}
        held: Dict[int, Any] = {}  # chunk index -> its read (a future), in the order fetched
        ahead = 0
        # a pages image's chunks read into buffers of ours are lent to CRIU's pipe (CRIU reads pages, nothing else)
        feed = imgstream.PipeFeed(fd, sum(length for _i, _o, length in pieces) if name.startswith("pages-") else 0,
                                  self.buffers.give)
        batch: List[Tuple[memoryview, Optional[int]]] = []  # pieces not yet written, up to WRITE_BATCH_BYTES
        batched = 0
        done_with: List[Any] = []  # buffers of chunks whose last piece is in `batch`
        keep = bytearray() if self.kept is not None and CORE_IMAGE.match(name) else None

        def flush() -> None:
            nonlocal batch, batched
            feed.write(batch, done_with)
            batch, batched = [], 0
            done_with.clear()

        try:
            for n, (idx, off, length) in enumerate(pieces):
                while ahead < len(order) and ahead <= rank[idx] + PREFETCH_CHUNKS:
                    nxt = order[ahead]
                    ahead += 1
                    if nxt not in held:
                        held[nxt] = self._fetch(refs[nxt], where)
                fut = held.get(idx)
                if fut is None:  # evicted while later slices still needed it
                    fut = held[idx] = self._fetch(refs[idx], where)
                if not fut.done() and batch:  # CRIU gets what is ready before this waits for a chunk
                    flush()
                data, buf = fut.result()
                batch.append((memoryview(data)[off:off + length], None if buf is None else buf.address + off))
                batched += length
                if keep is not None:
                    keep += batch[-1][0]
                if last_use[idx] == n:
                    del held[idx]
                    if buf is not None:
                        done_with.append(buf)
                if batched >= WRITE_BATCH_BYTES or len(batch) >= imgstream.IOV_BATCH:
                    flush()
                while len(held) > HELD_CHUNKS + PREFETCH_CHUNKS:  # an evicted chunk's buffer is not reused
                    held.pop(next(iter(held))).cancel()
            if batch:
                flush()
            if keep is not None:
                self.kept[name] = bytes(keep)
            log.debug("served %s: %d bytes, %d of them lent", name, feed.pos, feed.lent_bytes)
        finally:
            for fut in held.values():
                fut.cancel()


MODES = STREAM_MODES  # checkpoint.stream in agent.yaml and the site file (node/fields.py)


def allowed(settings, criu) -> bool:
    """Whether any dump may stream on this node: checkpoint.stream is not `off` and this CRIU has --stream (a dump
    that sends only written pages streams, so dirty tracking needs this too: engine._dirty_tracker)."""
    return getattr(settings, "stream", "auto") != "off" and criu.can_stream()


def wanted(settings, criu, images_dir: str) -> bool:
    """Whether streaming may be used at all (allowed, and the images directory is short enough for a socket
    address). Restores always stream then."""
    if not allowed(settings, criu):
        return False
    if not imgstream.sockets_fit(images_dir):
        log.warning("%s is too long a path for CRIU's streamer sockets: images are staged instead", images_dir)
        return False
    return True


PURPOSES = ("periodic", "final", "restore")  # what the images are streamed for


def stream_images(settings, criu, images_dir: str, *, staged_in_ram: bool, purpose: str) -> bool:
    """Whether a dump or a restore streams its images (`purpose`: periodic, final or restore).

    `always`: every one. `auto`: a final checkpoint and a restore stream (they are judged by their total time, and
    streaming overlaps CRIU, the hashing and the store's I/O instead of copying every image once more); a periodic
    checkpoint whose images fit in tmpfs is staged there, because the tool then resumes as soon as CRIU is done
    instead of once the store has taken every page (a shorter freeze, which is what a periodic checkpoint costs the
    job), and streams otherwise (no copy of the job's memory on local disk). `off`: never (also when this CRIU
    cannot stream, or the images directory is too long a path for its sockets)."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}")
    if not wanted(settings, criu, images_dir):
        return False
    return getattr(settings, "stream", "auto") == "always" or purpose != "periodic" or not staged_in_ram


def begin(settings, criu, chunks: ChunkStore, pool, images_dir: str, previous, *,
          staged_in_ram: bool, final: bool, written_only: bool = False,
          compare_written: bool = False) -> Optional[StreamDump]:
    """A started StreamDump for this checkpoint, or None to stage the images (engine.py's fallback).

    written_only: the tree's pages were write-protected when `previous` was taken (adapters/uffd.py) and CRIU has
    patch 0002: the dump streams (even a periodic one under `auto`: only the pages written since are dumped, so the
    tool resumes sooner than after staging every page) and CRIU sends the unchanged pages as holes. The caller
    checks stream_written_only() first. compare_written: the pages CRIU sends are compared by content too (a
    tracker that marks more than was written: soft-dirty's transparent huge pages)."""
    if written_only:
        return StreamDump(chunks, pool, images_dir, previous, written_only=True,
                          compare_written=compare_written).start()
    if not stream_images(settings, criu, images_dir, staged_in_ram=staged_in_ram,
                         purpose="final" if final else "periodic"):
        return None
    return StreamDump(chunks, pool, images_dir, previous).start()


def stream_written_only(settings, criu, images_dir: str, previous: Optional[Manifest]) -> bool:
    """Whether a dump may be written-only: streaming allowed, CRIU patched, and `previous` usable as its parent."""
    return wanted(settings, criu, images_dir) and criu.can_dump_written_only() and parents_usable(previous)


class _Done:
    """A chunk read in the calling thread (no pool), with a Future's result()/done()/cancel()."""

    def __init__(self, fn):
        self.value = fn()

    def result(self):
        return self.value

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False


def restore_streamed(criu, chunks: ChunkStore, images: List[ImageEntry], images_dir: str,
                     core_images: Optional[Dict[str, bytes]] = None, **restore_args) -> int:
    """`criu restore --stream` fed from the store through the serve socket. Returns the restored root's pid; the
    core images CRIU read are copied into `core_images` when given."""
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        source = StoreSource(chunks, images, pool, core_images)
        server = imgstream.ServeServer(images_dir, source).start()
        try:
            pid = criu.restore(images_dir, stream=True, **restore_args)
        finally:
            served = server.finish()
            log.debug("served %d images to CRIU, %d zero pages left out", len(served), source.zero_pages)
    return pid
