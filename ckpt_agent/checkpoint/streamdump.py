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
and checked by its sha256 on restore.

Restore: the images are served from verified chunks through the serve socket, read ahead by the chunk workers
(StoreSource); only cpuinfo.img is written to the images directory (for `criu cpuinfo check`).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from ckpt_agent.adapters.criu import pages_runs_from
from ckpt_agent.errors import DamagedCheckpointError, StoreError
from ckpt_agent.node.fields import STREAM_MODES
from ckpt_agent.store import imgstream, pagedelta
from ckpt_agent.store.chunks import CHUNK_BYTES, WORKERS, ChunkRef, ChunkStore, WriteStats
from ckpt_agent.store.manifest import ImageEntry, Manifest

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

    def __init__(self, name: str, putter: _Putter, keep: bool = False):
        self.name = name
        self.putter = putter
        self.buf = bytearray()
        self.futures: List[concurrent.futures.Future] = []
        self.size = 0
        self.kept = bytearray() if keep else None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.kept is not None:
            self.kept += data
        if not self.buf and len(data) == CHUNK_BYTES:  # a whole block (imgstream.read_block): no copy
            self.futures.append(self.putter.submit(data))
            return
        self.buf += data
        while len(self.buf) >= CHUNK_BYTES:
            self.futures.append(self.putter.submit(bytes(self.buf[:CHUNK_BYTES])))
            del self.buf[:CHUNK_BYTES]

    def close(self) -> None:
        if self.buf:
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
        refs: List[ChunkRef] = []
        index: Dict[str, int] = {}
        slices = []
        old_bytes = 0
        for key, off, length in self.slices:
            is_old = isinstance(key, ChunkRef)
            ref = key if is_old else new_refs[key]
            if ref.digest not in index:
                index[ref.digest] = len(refs)
                refs.append(ref)
                if is_old:
                    old_bytes += ref.size
            slices.append([index[ref.digest], off, length])
        entry = ImageEntry(name=self.name, size=self.size, chunks=refs, slices=slices)
        if old_bytes:
            new_bytes = sum(r.size for r in new_refs)
            too_costly = old_bytes + new_bytes > pagedelta.MAX_READ_AMPLIFICATION * self.size
            # the next generation stores this image anew when reading it back costs too much
            entry.delta_depth = pagedelta.MAX_DELTA_DEPTH if too_costly else depth
        npages = len(self.hashes) // pagedelta.HASH_BYTES
        if runs is not None and npages and sum(n for _, n in runs) == npages:
            return entry, (pagedelta.run_vaddrs(runs), self.hashes)  # stored by StreamDump.finish
        return entry, None


class ReuseMap:
    """page hash -> where a chunk of the previous generation holds that page. One int a page (the chunk's number in
    `refs` << OFFSET_BITS | the offset in it), about 110 bytes a page with the key; a (chunk, offset) tuple a page
    cost about 180."""

    OFFSET_BITS = 32

    def __init__(self) -> None:
        self.where: Dict[bytes, int] = {}
        self.refs: List[ChunkRef] = []
        self._numbers: Dict[str, int] = {}

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
        gone = {self._numbers[d] for d in digests if d in self._numbers}
        if gone:
            self.where = {h: v for h, v in self.where.items() if v >> self.OFFSET_BITS not in gone}


def reuse_map(chunks: ChunkStore, pool, previous: Optional[Manifest]) -> Tuple[ReuseMap, int, WriteStats]:
    """Where each page of every pages image of the previous generation is, by its hash, and the delta depth the new
    generation will have. Empty (a full generation) without page tables or once MAX_DELTA_DEPTH is reached. Chunks
    due for checking are checked first (ChunkStore.intact); a rotten one is left out (its pages are stored anew,
    repairing it)."""
    stats = WriteStats()
    out = ReuseMap()
    images = [i for i in (previous.images if previous else []) if i.name.startswith("pages-")]
    depth = 1 + max([i.delta_depth or 0 for i in images] or [0])
    if pagedelta.PAGE_HASH is None or not images or depth > pagedelta.MAX_DELTA_DEPTH:
        return out, 0, stats
    page = pagedelta.PAGE
    for img in images:
        try:
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

    def rotten(ref: ChunkRef) -> Optional[str]:
        return None if chunks.intact(ref, "previous pages") else ref.digest

    bad = {d for d in pool.map(rotten, due.values()) if d}
    stats.chunks_verified = len(due)
    if bad:
        chunks.unclaim(bad)
        out.drop(bad)
    return out, depth, stats


class StreamDump:
    """One streamed dump into the store: start() before `criu dump --stream -D images_dir`, finish() after it
    returned (the images' manifest entries and stats), abort() when it failed."""

    def __init__(self, chunks: ChunkStore, pool, images_dir: str, previous: Optional[Manifest] = None):
        self.chunks = chunks
        self.pool = pool
        _pin_mmap_threshold()
        self._t0 = time.monotonic()
        self._times: Dict[str, float] = {}  # where a streamed dump's time goes (debug log)
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
            self.reuse, self.depth, self._verify_stats = reuse_map(self.chunks, self.pool, previous)
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
            sink = FileSink(name, self.putter, keep=name.startswith("pagemap-"))
        with self._lock:
            self.sinks[name] = sink
        return sink

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

    def finish(self) -> Tuple[List[ImageEntry], WriteStats]:
        self._times["criu"] = time.monotonic() - self._t0
        self.server.finish()
        self._reuse()  # built, or its error raised, even when CRIU sent no pages image
        self._times["drained"] = time.monotonic() - self._t0
        pagemaps = [bytes(s.kept) for s in self.sinks.values() if isinstance(s, FileSink) and s.kept is not None]
        images = []
        stats = WriteStats()
        stats.add(self._verify_stats)
        for name in sorted(self.sinks):
            sink = self.sinks[name]
            if isinstance(sink, PagesSink):
                entry, table = sink.entry(pages_runs_from(pagemaps, name), self.depth)
                reused = {r.digest for r in entry.chunks} - {f.result()[0].digest for f in sink.futures}
                stats.chunks_reused += len(reused)
                if table is not None:
                    entry.pagetable, tst = pagedelta.store_table(self.chunks, *table, self.pool)
                    stats.add(tst)
            else:
                entry = sink.entry()
            images.append(entry)
        stats.add(self.putter.stats)
        self._times["tables"] = time.monotonic() - self._t0
        log.debug("streamed dump: reuse map of %d pages %.2f s; CRIU done at %.2f s, pipes drained at %.2f s, page "
                  "tables stored at %.2f s", len(self.reuse), self._times["reuse_map"], self._times["criu"],
                  self._times["drained"], self._times["tables"])
        # put() counted the bytes it was handed; pages taken over from older chunks were looked at too
        stats.bytes_in += sum(s.reused_bytes for s in self.sinks.values() if isinstance(s, PagesSink))
        return images, stats


PREFETCH_CHUNKS = 8  # chunks read and verified ahead of the one CRIU is reading, per image being served
HELD_CHUNKS = 32  # at most this many chunks held for later slices of a delta (one evicted is read again if needed)


class StoreSource:
    """Images of one manifest, served from verified chunks (restore through the serve socket).

    The chunks of an image are read, decompressed and checked by the pool, up to PREFETCH_CHUNKS ahead of the one
    being written to CRIU's pipe, in the order the image's slices first need them: the store's reads and the sha256
    work overlap each other and CRIU, as a staged restore's parallel chunk reads do. A chunk that later slices of a
    delta come back to is kept (up to HELD_CHUNKS) until its last use."""

    def __init__(self, chunks: ChunkStore, images: List[ImageEntry],
                 pool: Optional[concurrent.futures.Executor] = None):
        self.chunks = chunks
        self.pool = pool
        self.images = {os.path.basename(i.name): i for i in images}

    def exists(self, name: str) -> bool:
        return name in self.images

    def _fetch(self, ref: ChunkRef, where: str):
        if self.pool is None:
            return _Done(self.chunks.get, ref, where)
        return self.pool.submit(self.chunks.get, ref, where)

    def write_to(self, name: str, fd: int) -> None:
        img = self.images[name]
        refs = img.chunks
        pieces = img.pieces()
        where = f"image {name}"
        last_use: Dict[int, int] = {}
        for n, (idx, _off, _len) in enumerate(pieces):
            last_use[idx] = n
        order = list(dict.fromkeys(idx for idx, _o, _l in pieces))  # each chunk once, in first-use order
        rank = {idx: r for r, idx in enumerate(order)}
        held: Dict[int, Any] = {}  # chunk index -> its read (a future), in the order fetched
        ahead = 0
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
                data = fut.result()
                imgstream.write_all(fd, memoryview(data)[off:off + length])
                if last_use[idx] == n:
                    del held[idx]
                while len(held) > HELD_CHUNKS + PREFETCH_CHUNKS:
                    held.pop(next(iter(held))).cancel()
        finally:
            for fut in held.values():
                fut.cancel()

    def write_file(self, name: str, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self.write_to(name, fd)
        finally:
            os.close(fd)


MODES = STREAM_MODES  # checkpoint.stream in agent.yaml and the site file (node/fields.py)


def wanted(settings, criu, images_dir: str) -> bool:
    """Whether streaming may be used at all (not `off`, this CRIU has --stream, and the images directory is short
    enough for a socket address). Restores always stream then."""
    if getattr(settings, "stream", "auto") == "off" or not criu.can_stream():
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
          staged_in_ram: bool, final: bool) -> Optional[StreamDump]:
    """A started StreamDump for this checkpoint, or None to stage the images (engine.py's fallback)."""
    if not stream_images(settings, criu, images_dir, staged_in_ram=staged_in_ram,
                         purpose="final" if final else "periodic"):
        return None
    return StreamDump(chunks, pool, images_dir, previous).start()


def check_cpu(criu, chunks: ChunkStore, images: List[ImageEntry], images_dir: str) -> None:
    """`criu cpuinfo check` against the checkpoint's cpuinfo.img, the one image written to images_dir."""
    source = StoreSource(chunks, images)
    if source.exists("cpuinfo.img"):
        source.write_file("cpuinfo.img", os.path.join(images_dir, "cpuinfo.img"))
    criu.cpuinfo_check(images_dir)


class _Done:
    """A chunk read in the calling thread (no pool), with a Future's result()/cancel()."""

    def __init__(self, fn, *args):
        self.value = fn(*args)

    def result(self):
        return self.value

    def cancel(self) -> bool:
        return False


def restore_streamed(criu, chunks: ChunkStore, images: List[ImageEntry], images_dir: str, **restore_args) -> int:
    """`criu restore --stream` fed from the store through the serve socket. Returns the restored root's pid."""
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        server = imgstream.ServeServer(images_dir, StoreSource(chunks, images, pool)).start()
        try:
            pid = criu.restore(images_dir, stream=True, **restore_args)
        finally:
            served = server.finish()
            log.debug("served %d images to CRIU", len(served))
    return pid
