"""Checkpoint and restore through CRIU's image streamer (`--stream`): no full staging copy of the images.

Dump: CRIU writes each image into a pipe (store/imgstream.py) and the images enter the chunk store as they arrive,
so the dump overlaps with hashing and writing, and the extra memory a checkpoint needs is a few chunks per open
image (MAX_INFLIGHT_CHUNKS, plus the page-hash tables), not the job's size. The images directory only holds
CRIU's log, its stats files and the sockets.

Pages images arrive before their pagemap (CRIU writes pagemap-N.img and pages-N.img side by side and closes the
pagemap last), so incrementals here are by content, not by address:
  1. before the dump, a map page hash -> (chunk, offset) is built from the previous generation's page tables
     (every pages image of it), after verifying the chunks the scrub policy picks (rotten ones are left out);
  2. while pages stream in, each page is hashed (xxh3-128); a page whose hash is in the map becomes a slice of the
     old chunk, any other is packed into new 1 MiB chunks, written while the dump goes on;
  3. once CRIU is done, the pagemap gives the pages' addresses and the (vaddr, hash) page table is stored, as on
     the staged path (store/pagedelta.py), for the next generation.
Compaction follows pagedelta's rules where they can be applied to a stream: after MAX_DELTA_DEPTH generations that
reuse old pages, the next stores all pages anew; a generation whose restore would read more than
MAX_READ_AMPLIFICATION times its size marks itself so that the next one is stored anew. Every chunk is still named
and checked by its sha256 on restore.

Restore: the images are served from verified chunks through the serve socket; only cpuinfo.img is written to the
images directory (for `criu cpuinfo check`).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import os
import threading
from typing import Any, Dict, List, Optional, Tuple

from ckpt_agent.adapters.criu import pages_runs_from
from ckpt_agent.errors import DamagedCheckpointError, StoreError
from ckpt_agent.store import imgstream, pagedelta
from ckpt_agent.store.chunks import CHUNK_BYTES, ChunkRef, ChunkStore, WriteStats
from ckpt_agent.store.manifest import ImageEntry, Manifest

log = logging.getLogger(__name__)

MAX_INFLIGHT_CHUNKS = 8  # chunks handed to the pool and not yet stored, per checkpoint: bounds RAM to ~8 MiB
M_MMAP_THRESHOLD = -3  # mallopt(3): buffers above this size are mmap'ed, and unmapped at once when freed
# glibc raises its mmap threshold whenever an mmap'ed buffer is freed (up to 32 MiB), after which the 1 MiB chunk
# buffers come from per-thread heaps that keep freed memory: pinning the threshold keeps the checkpointer's RSS at
# the buffers in flight
MMAP_THRESHOLD_BYTES = 256 << 10


def _pin_mmap_threshold() -> None:
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
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


HASH_BYTES = 16  # xxh3-128


class _Vaddrs:
    """The pages' virtual addresses from the pagemap's runs, generated, not held (8+ bytes a page otherwise)."""

    def __init__(self, runs):
        self.runs = runs

    def __len__(self) -> int:
        return sum(n for _, n in self.runs)

    def __iter__(self):
        for v, n in self.runs:
            for k in range(n):
                yield v + k * pagedelta.PAGE


class _Hashes:
    def __init__(self, packed: bytearray):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed) // HASH_BYTES

    def __iter__(self):
        view = memoryview(self.packed)
        for i in range(0, len(view), HASH_BYTES):
            yield bytes(view[i:i + HASH_BYTES])


class PagesSink:
    """A pages-N.img: hashed page by page; pages found in `reuse` become slices of old chunks, the rest new chunks."""

    def __init__(self, name: str, putter: _Putter, reuse: Dict[bytes, Tuple[ChunkRef, int]]):
        self.name = name
        self.putter = putter
        self.reuse = reuse
        self.buf = bytearray()
        self.new = bytearray()
        self.futures: List[concurrent.futures.Future] = []
        self.hashes = bytearray()  # 16 bytes a page, packed: a list of bytes objects would cost 57
        # [key, offset, length]; key: ("o", ChunkRef) for an old chunk, ("n", k) for the k-th new chunk
        self.slices: List[list] = []
        self.size = 0
        self.reused_bytes = 0

    def _slice(self, key, off: int, length: int) -> None:
        last = self.slices[-1] if self.slices else None
        if last is not None and last[0] == key and last[1] + last[2] == off:
            last[2] += length
        else:
            self.slices.append([key, off, length])

    def _new_piece(self, data) -> None:
        if len(self.new) + len(data) > CHUNK_BYTES:
            self._flush_new()
        self._slice(("n", len(self.futures)), len(self.new), len(data))
        self.new += data

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
        for off in range(0, whole, page):
            pg = view[off:off + page]
            h = pagedelta.page_hash(pg)
            self.hashes += h
            old = self.reuse.get(h)
            if old is not None:
                self._slice(("o", old[0]), old[1], page)
                self.reused_bytes += page
            else:
                self._new_piece(pg)

    def close(self) -> None:
        if self.buf:  # never for a CRIU pages image (whole pages only); kept as data all the same
            self.hashes = bytearray()  # no page table for a file that is not whole pages
            self._new_piece(bytes(self.buf))
            self.buf = bytearray()
        self._flush_new()

    def entry(self, runs, depth: int) -> Tuple[ImageEntry, Optional[Tuple[_Vaddrs, _Hashes]]]:
        """The image's manifest entry, and its page table to store (None when the pagemap does not match)."""
        new_refs = [f.result()[0] for f in self.futures]
        refs: List[ChunkRef] = []
        index: Dict[str, int] = {}
        slices = []
        old_bytes = 0
        for key, off, length in self.slices:
            ref = key[1] if key[0] == "o" else new_refs[key[1]]
            if ref.digest not in index:
                index[ref.digest] = len(refs)
                refs.append(ref)
                if key[0] == "o":
                    old_bytes += ref.size
            slices.append([index[ref.digest], off, length])
        entry = ImageEntry(name=self.name, size=self.size, chunks=refs, slices=slices)
        if old_bytes:
            new_bytes = sum(r.size for r in new_refs)
            too_costly = old_bytes + new_bytes > pagedelta.MAX_READ_AMPLIFICATION * self.size
            # the next generation stores this image anew when reading it back costs too much
            entry.delta_depth = pagedelta.MAX_DELTA_DEPTH if too_costly else depth
        npages = len(self.hashes) // HASH_BYTES
        if runs is not None and npages and sum(n for _, n in runs) == npages:
            return entry, (_Vaddrs(runs), _Hashes(self.hashes))  # stored by StreamDump.finish
        return entry, None


def reuse_map(chunks: ChunkStore, pool, previous: Optional[Manifest]
              ) -> Tuple[Dict[bytes, Tuple[ChunkRef, int]], int, WriteStats]:
    """page hash -> (chunk, offset) over every pages image of the previous generation, and the delta depth the new
    one will have. Empty (a full generation) without page tables or once MAX_DELTA_DEPTH is reached. Chunks the
    scrub policy picks are re-read first; a rotten one is left out (its pages are stored anew, repairing it)."""
    stats = WriteStats()
    images = [i for i in (previous.images if previous else []) if i.name.startswith("pages-")]
    depth = 1 + max([i.delta_depth or 0 for i in images] or [0])
    if pagedelta.PAGE_HASH is None or not images or depth > pagedelta.MAX_DELTA_DEPTH:
        return {}, 0, stats
    out: Dict[bytes, Tuple[ChunkRef, int]] = {}
    for img in images:
        try:
            table = pagedelta.load_table(chunks, img, f"image {img.name}")
        except DamagedCheckpointError:
            continue
        refs, pieces = img.chunks, img.pieces()
        if table is None:
            continue
        by_offset = sorted((off, h) for h, off in table.values())
        pos = 0
        it = iter(by_offset)
        nxt = next(it, None)
        for idx, off, length in pieces:
            while nxt is not None and nxt[0] < pos + length:
                inner = nxt[0] - pos
                if inner >= 0 and inner + pagedelta.PAGE <= length and idx < len(refs):
                    out.setdefault(nxt[1], (refs[idx], off + inner))
                nxt = next(it, None)
            pos += length
    due = {ref.digest: ref for ref, _ in out.values() if chunks.claim_verification(ref.digest)}

    def rotten(ref: ChunkRef) -> Optional[str]:
        try:
            chunks.get(ref, "previous pages")
        except DamagedCheckpointError:
            return ref.digest
        return None

    bad = {d for d in pool.map(rotten, due.values()) if d}
    stats.chunks_verified = len(due)
    if bad:
        chunks.unclaim(bad)
        out = {h: v for h, v in out.items() if v[0].digest not in bad}
    return out, depth, stats


class StreamDump:
    """One streamed dump into the store: start() before `criu dump --stream -D images_dir`, finish() after it
    returned (the images' manifest entries and stats), abort() when it failed."""

    def __init__(self, chunks: ChunkStore, pool, images_dir: str, previous: Optional[Manifest] = None):
        self.chunks = chunks
        self.pool = pool
        _pin_mmap_threshold()
        self.reuse, self.depth, self._verify_stats = reuse_map(chunks, pool, previous)
        self.putter = _Putter(chunks, pool)
        self.sinks: Dict[str, Any] = {}
        self._lock = threading.Lock()
        self.server = imgstream.CaptureServer(images_dir, self._open)

    def _open(self, name: str):
        if name in self.sinks:
            raise imgstream.StreamError(f"CRIU sent image {name} twice")
        if name.startswith("pages-"):
            sink = PagesSink(name, self.putter, self.reuse)
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
        for e in self.server.errors[:1]:
            log.warning("image stream failed: %s", e)
        failed = [f.exception() for sink in list(self.sinks.values()) for f in sink.futures]
        store_errors = [e for e in self.server.errors + failed if isinstance(e, (OSError, StoreError))]
        return store_errors[0] if store_errors else None

    def finish(self) -> Tuple[List[ImageEntry], WriteStats]:
        self.server.finish()
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
        # put() counted the bytes it was handed; pages taken over from older chunks were looked at too
        stats.bytes_in += sum(s.reused_bytes for s in self.sinks.values() if isinstance(s, PagesSink))
        return images, stats


class StoreSource:
    """Images of one manifest, served from verified chunks (restore through the serve socket)."""

    def __init__(self, chunks: ChunkStore, images: List[ImageEntry]):
        self.chunks = chunks
        self.images = {os.path.basename(i.name): i for i in images}

    def exists(self, name: str) -> bool:
        return name in self.images

    def write_to(self, name: str, fd: int) -> None:
        img = self.images[name]
        refs = img.chunks
        cache: Dict[int, bytes] = {}
        for idx, off, length in img.pieces():
            data = cache.get(idx)
            if data is None:
                data = self.chunks.get(refs[idx], f"image {name}")
                if len(cache) >= 4:  # slices of a delta mostly go back to recent chunks; bound what is held
                    cache.pop(next(iter(cache)))
                cache[idx] = data
            imgstream.write_all(fd, memoryview(data)[off:off + length])

    def write_file(self, name: str, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            self.write_to(name, fd)
        finally:
            os.close(fd)


MODES = ("auto", "always", "off")  # checkpoint.stream in agent.yaml


def wanted(settings, criu, images_dir: str) -> bool:
    """Whether streaming may be used at all (not `off`, this CRIU has --stream, and the images directory is short
    enough for a socket address). Restores always stream then."""
    if getattr(settings, "stream", "auto") == "off" or not criu.can_stream():
        return False
    if not imgstream.sockets_fit(images_dir):
        log.warning("%s is too long a path for CRIU's streamer sockets: images are staged instead", images_dir)
        return False
    return True


def stream_images(settings, criu, images_dir: str, *, staged_in_ram: bool) -> bool:
    """Whether a dump or a restore streams its images. `always`: every one. `auto`: those whose images would
    otherwise be staged on local disk; images that fit in tmpfs are staged there, which is faster on few cores (the
    chunk workers hash and compress in parallel, where a stream is hashed as it arrives) and, for a periodic
    checkpoint, unfreezes the tool as soon as CRIU is done instead of once the store has taken every page. `off`:
    never (also when this CRIU cannot stream, or the images directory is too long a path for its sockets)."""
    if not wanted(settings, criu, images_dir):
        return False
    return getattr(settings, "stream", "auto") == "always" or not staged_in_ram


def begin(settings, criu, chunks: ChunkStore, pool, images_dir: str, previous, *,
          staged_in_ram: bool) -> Optional[StreamDump]:
    """A started StreamDump for this checkpoint, or None to stage the images (engine.py's fallback)."""
    if not stream_images(settings, criu, images_dir, staged_in_ram=staged_in_ram):
        return None
    return StreamDump(chunks, pool, images_dir, previous).start()


def check_cpu(criu, chunks: ChunkStore, images: List[ImageEntry], images_dir: str) -> None:
    """`criu cpuinfo check` against the checkpoint's cpuinfo.img, the one image written to images_dir."""
    source = StoreSource(chunks, images)
    if source.exists("cpuinfo.img"):
        source.write_file("cpuinfo.img", os.path.join(images_dir, "cpuinfo.img"))
    criu.cpuinfo_check(images_dir)


def restore_streamed(criu, chunks: ChunkStore, images: List[ImageEntry], images_dir: str, **restore_args) -> int:
    """`criu restore --stream` fed from the store through the serve socket. Returns the restored root's pid."""
    server = imgstream.ServeServer(images_dir, StoreSource(chunks, images)).start()
    try:
        pid = criu.restore(images_dir, stream=True, **restore_args)
    finally:
        served = server.finish()
        log.debug("served %d images to CRIU", len(served))
    return pid
