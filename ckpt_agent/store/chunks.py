"""Content-addressed chunk storage inside one job directory of the checkpoint store.

A chunk is up to CHUNK_BYTES of a file (a CRIU image or a captured file), named by the digest of its raw bytes and
stored once per job under `chunks/<first two hex digits>/<digest><codec suffix>` (store/layout.py: none for raw,
`.zst` for zstd-compressed, used only where compression saves space). A checkpoint writes only chunks the job has
not stored before, which is what makes checkpoints incremental on every kernel (CRIU's own pre-dump needs soft-dirty
tracking, which many kernels, this project's CI machine and all arm64 among them, lack). `sweep_chunk_dir` removes
what no kept manifest references, knowing every codec's suffix.

Chunk files appear under their final name only once complete (written to a temporary name, then renamed), so a
crash never leaves a truncated chunk that a later checkpoint would reuse. Durability comes from one syncfs() of the
store's file system before the manifest is committed, instead of one fsync per chunk; each chunk's writeback is
started as soon as it is written (sync_file_range, a hint only), so the disk works while later chunks are hashed
and that syncfs finds little left to write.

A chunk at rest is not trusted forever: `verify_reused` (set per checkpoint by the engine) picks the reused chunks to
check before a manifest refers to them again. A chunk that no longer matches (a flipped bit, a truncated or
missing file) is rewritten from the fresh data under the same name and codec, which also repairs every older
generation that refers to it. Verifying costs a read and a compare (a decompression for .zst chunks) of each chunk
verified, no hash: the data it must equal is in hand; each digest is verified once per checkpoint.

Checking without re-reading: this process remembers the stat (device, inode, size, mtime, ctime) of every chunk file
it wrote, or read back and found whole (CHECKED). Any write to a file, a truncation or a file put in its place
changes its ctime or inode, and nobody can set a ctime back, so while the file stats the same its bytes are the ones
checked. Of the chunks `verify_reused` picks, those `scrub` does not pick are checked by that stat alone when it
matches (one stat instead of a read: a final checkpoint of a 100 GiB job would otherwise re-read 100 GiB from the
store inside the Spot notice); every other is re-read (engine.reuse_checks: a final checkpoint's `scrub` picks
none). Rot below the file system, which no stat shows, is what the periodic checkpoints' rotating `scrub` slice finds,
and every restore still checks every chunk it reads by its digest. One window is left:
a file system whose timestamps are coarse (kernels before 6.13 tick in milliseconds, Lustre in seconds) does not
show a same-size write within the same tick as the chunk's own write; the periodic scrub slice and the restore's
check cover that too.

The digest: BLAKE3 (256 bits, hex; manifest format 4 and later) names every chunk written. It is a cryptographic hash
like sha256, which named the chunks of formats 1-3, and 4-5 times as fast on one core (1 GiB in ~0.1 s against ~0.27
s with SHA-NI on the dev VM): on a node of few cores, hashing every chunk was the largest part of a full checkpoint's
CPU time and of a restore's. A chunk is accepted when its bytes have the referenced digest under either hash
(`digest_matches`), so a generation written before, and the chunks a newer generation still shares with it (the
unchanged runs of a delta, unchanged captured files), restore as before; a chunk matches a digest it was not written
under only by a preimage of BLAKE3 or of sha256. New data is never deduplicated against a sha256-named chunk: the
same bytes are stored once more, under their BLAKE3 name. A site whose policy admits only FIPS-approved hashes sets
`checkpoint.chunk_digest: sha256` (a ChunkStore's `digest`): its chunks are then named by sha256, as before.

Speed on small machines: WORKERS threads (at least 4, even on 2 CPUs) keep the store's disk busy while chunks are
hashed. Compression, the CPU-bound part, runs on at most CPUs - 1 chunks at a time (process-wide; one CPU stays free
for hashing, copying and the kernel's writeback), and a chunk that would have to wait for a compression slot is
stored raw instead: with many cores nearly every compressible chunk is compressed, and compression never queues a
checkpoint behind the CPU. All-zero chunks are recognised by a compare, not hashed.

The codec outruns the disk where it can: once per process, zstd's speed at levels 1, -1, -3 and -5 is measured on
netlist-like text and the store's durable write bandwidth with a small probe file; a store uses the best-compressing
level whose speed on the compression slots keeps up with that bandwidth (choose_level), and none where no level
does: there compressing the chunks a free slot could take cost more time than the bytes it saved (on the 2-vCPU dev
VM against its local disk, 1.5 GB/s, zstd -3 at 0.7 GB/s a core: a full checkpoint of 1 GiB of netlist-like text
took 0.98-1.02 s compressing about one chunk in six, 0.75-0.79 s storing all raw; bench/checkpoint_bench.py). FSx gives
each node far less than a core's zstd speed, so nodes compress there. The all-zero chunk (once per job) is always
compressed: zstd takes it at memory speed. Whether a chunk is worth
compressing at all is decided from a 64 KiB sample in four pieces spread over it (probe): random data costs one
small compression, not a whole chunk's. `warm_up` takes both measurements in the background when a job starts on the
node (`ckpt run` as root, the node agent's launch and restore), so that they are not taken inside the job's first
checkpoint: on a node that has just restored a job, that one may be the final checkpoint of a Spot notice, and the
probe writes to the shared file system every reclaimed node is writing to at that moment.

The probe is taken once per process, when the job starts; a final checkpoint may meet a different store: FSx shared
by every node reclaimed at the same moment, or a job bigger than the kernel's dirty page limits. So each store also
times its own chunk writes (WritePace: the median of the last 16), and where the probe chose raw, a chunk is
compressed once the writes have slowed down enough that compressing it on a free slot and writing the rest is sooner
than writing it raw (paced_level, from the levels' speeds and ratios on netlist-like text; the chunk's own sample
must then compress well enough that this still holds for it). Writes into the page cache went at 0.77-1.9 GB/s a
worker on the 2-vCPU dev VM during a full streamed checkpoint (the median of 16, 1 GiB of text), where compressing
starts to pay below about 0.25 GB/s: there nothing changes (bench/codec_bench.py holds a store back to show the
rest).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import blake3
import zstandard

from ckpt_agent.errors import DamagedCheckpointError, StoreError
from ckpt_agent.store import layout
from ckpt_agent.store.layout import CODEC_RAW, CODEC_ZSTD
from ckpt_agent.util.safeio import (
    DirectIOUnsupported,
    NotRegularFile,
    direct_buffer_bytes,
    open_dir_nofollow,
    read_regular_direct,
    read_regular_stat,
    scandir_names,
)
from ckpt_agent.util.usercreds import Creds, acting_as

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20  # 1 MiB: small enough that a local change rewrites little, large enough to keep file counts sane
COMPRESS_PROBE_BYTES = 64 << 10  # try compressing this much first; random data is stored raw without more effort
PROBE_PIECES = 4  # ... taken as this many pieces spread over the chunk (a header or one odd region decides nothing)
# zstd levels the codec is chosen from, best ratio first: negative levels trade ratio for 2-4x the speed of level 1
ZSTD_LEVELS = (1, -1, -3, -5)
SPEED_SAMPLE_BYTES = 2 << 20  # netlist-like text each level compresses once per process to measure its speed
BANDWIDTH_PROBE_BYTES = 8 << 20  # written and fdatasync'ed once per process and store file system
COMPRESS_MIN_SAVING = 0.10  # store compressed only when it saves at least 10%
PACE_WINDOW = 16  # WritePace: the chunk writes whose median pace counts
PACE_MIN_BYTES = 256 << 10  # ... writes smaller than this are not timed: their fixed costs would pass for a slow store
CPUS = os.cpu_count() or 2
# threads per checkpoint: at least 4 so the disk always has writes queued while other chunks are hashed, even on 2 CPUs
WORKERS = max(4, min(8, CPUS))
CHECK_BATCHES = 4 * WORKERS  # ChunkStore.rotten: reused chunks are checked in this many batches
# chunks compressed at once, process-wide: zstd is CPU-bound; one CPU stays free for hashing, copying and writeback
COMPRESS_SLOTS = max(1, CPUS - 1)
ZERO_CHUNK = bytes(CHUNK_BYTES)
BLAKE3, SHA256 = layout.CHUNK_DIGESTS  # the hashes that name chunks (checkpoint.chunk_digest)
DEFAULT_DIGEST = BLAKE3
ZERO_CHUNK_DIGEST = blake3.blake3(ZERO_CHUNK).hexdigest()
SHA256_ZERO_CHUNK_DIGEST = hashlib.sha256(ZERO_CHUNK).hexdigest()  # the same, as formats 1-3 named it
_ZERO_DIGEST = {BLAKE3: ZERO_CHUNK_DIGEST, SHA256: SHA256_ZERO_CHUNK_DIGEST}
ZERO_CHUNK_DIGESTS = frozenset(_ZERO_DIGEST.values())
# sync_file_range(2) flag: start writeback of the file's dirty pages without waiting for it
SYNC_FILE_RANGE_WRITE = 2
# zstd frames are never stored unless they save 10%; this slack only covers frame headers of tiny chunks
ZSTD_SLACK_BYTES = 1024



_STAT_KEY = struct.Struct("<QQQqq")  # device, inode, size, mtime ns, ctime ns of a checked chunk file


def _stat_key(st: os.stat_result) -> bytes:
    return _STAT_KEY.pack(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CheckedFiles:
    """Chunk files this process wrote, or read back and found whole, by store root: chunk -> their stat then.

    About 150 bytes a chunk (a 500 GiB job: ~75 MiB); the stores of the MAX_ROOTS jobs used last are remembered (an
    agent serves many jobs over its life)."""

    MAX_ROOTS = 64

    def __init__(self) -> None:
        self._roots: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(ref: ChunkRef) -> bytes:
        return bytes.fromhex(ref.digest[:32]) + ref.codec.encode()

    def _root(self, root: str) -> Dict[bytes, bytes]:
        files = self._roots.get(root)
        if files is None:
            files = self._roots[root] = {}
            while len(self._roots) > self.MAX_ROOTS:
                self._roots.popitem(last=False)
        else:
            self._roots.move_to_end(root)
        return files

    def record(self, root: str, ref: ChunkRef, st: os.stat_result) -> None:
        with self._lock:
            self._root(root)[self._key(ref)] = _stat_key(st)

    def forget(self, root: str, ref: ChunkRef) -> None:
        with self._lock:
            self._root(root).pop(self._key(ref), None)

    def unchanged(self, root: str, ref: ChunkRef, st: os.stat_result) -> bool:
        """Whether `st` (a fresh lstat of the chunk's file) is the stat recorded when it was checked."""
        with self._lock:
            known = self._root(root).get(self._key(ref))
        return known is not None and stat.S_ISREG(st.st_mode) and known == _stat_key(st)


CHECKED = CheckedFiles()


class ChunkRef(NamedTuple):
    """A chunk as a manifest lists it: hex digest (chunk_digest), raw size, codec. A tuple: a manifest of a 500 GiB job
    holds half a million, and as a frozen dataclass each took 104 bytes (80 now, the digest string aside) and its
    construction a third of the time decoding the manifest (measured on the dev VM)."""

    digest: str
    size: int
    codec: str

    def to_json(self) -> list:
        return [self.digest, self.size, self.codec]

    def all_zero(self) -> bool:
        """Whether this is the all-zero chunk (known from its name: nothing needs reading)."""
        return self.digest in ZERO_CHUNK_DIGESTS and self.size == CHUNK_BYTES

    @classmethod
    def from_json(cls, value: Sequence) -> ChunkRef:
        digest, size, codec = value
        return cls(str(digest), int(size), str(codec))


@dataclass
class WriteStats:
    bytes_in: int = 0  # raw bytes looked at
    bytes_new: int = 0  # raw bytes of chunks this job had not stored before
    bytes_written: int = 0  # bytes actually written (after compression)
    chunks_new: int = 0
    chunks_reused: int = 0
    chunks_verified: int = 0  # reused chunks re-read and compared with the fresh data
    chunks_repaired: int = 0  # of those, rotten ones rewritten

    def add(self, other: WriteStats) -> None:
        self.bytes_in += other.bytes_in
        self.bytes_new += other.bytes_new
        self.bytes_written += other.bytes_written
        self.chunks_new += other.chunks_new
        self.chunks_reused += other.chunks_reused
        self.chunks_verified += other.chunks_verified
        self.chunks_repaired += other.chunks_repaired


_libc = ctypes.CDLL(None, use_errno=True)
_compress_slots = threading.BoundedSemaphore(COMPRESS_SLOTS)
try:
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except AttributeError:  # not Linux/glibc: writeback then starts at syncfs, which is only slower
    _sync_file_range = None


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages now. Only a hint: durability still comes from syncfs
    before the manifest, so any failure here (a file system without support) is ignored."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def probe(data: bytes) -> bytes:
    """COMPRESS_PROBE_BYTES of `data` in PROBE_PIECES pieces spread over it: what decides, cheaply, whether the
    whole chunk is worth compressing."""
    if len(data) <= COMPRESS_PROBE_BYTES:
        return data
    piece = COMPRESS_PROBE_BYTES // PROBE_PIECES
    step = (len(data) - piece) // (PROBE_PIECES - 1)
    return b"".join(data[i * step:i * step + piece] for i in range(PROBE_PIECES))


def _text_sample(nbytes: int) -> bytes:
    """Deterministic netlist-like text (what EDA tools hold), to time the codecs on."""
    import random

    rng = random.Random(5)
    lines = []
    size = 0
    while size < nbytes:
        line = (f"M{size} net_{rng.randrange(1 << 20)} net_{rng.randrange(1 << 20)} vss nch "
                f"W={rng.randrange(1, 400) / 100:.2f}u L={rng.randrange(1, 40) / 100:.2f}u\n")
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:nbytes]


_speeds: Dict[int, float] = {}
_ratios: Dict[int, float] = {}  # zstd level -> compressed/raw size of the same sample (codec_ratios)
_bandwidths: Dict[int, float] = {}
_measure_lock = threading.Lock()
_warm_lock = threading.Lock()


def codec_speeds() -> Dict[int, float]:
    """zstd level -> compression bytes/s of one core on this machine, measured once per process (about 0.15-0.25 s
    of one CPU on the 2-vCPU bench machine, much of it building the sample)."""
    with _measure_lock:
        if not _speeds:
            sample = _text_sample(SPEED_SAMPLE_BYTES)
            for level in ZSTD_LEVELS:
                cctx = zstandard.ZstdCompressor(level=level)
                t = time.perf_counter()
                packed = cctx.compress(sample)
                _speeds[level] = len(sample) / max(time.perf_counter() - t, 1e-6)
                _ratios[level] = len(packed) / len(sample)
        return dict(_speeds)


def codec_ratios() -> Dict[int, float]:
    """zstd level -> compressed size / raw size of the netlist-like text codec_speeds times (measured with it)."""
    codec_speeds()
    with _measure_lock:
        return dict(_ratios)


def _probe_file(root: str) -> Tuple[int, Optional[str]]:
    """An open file under `root` to time writes with, and its name: unnamed (O_TMPFILE) where the file system
    allows it, so that a process killed in the middle of the probe leaves nothing behind; else a named one (None:
    nothing to unlink)."""
    try:
        return os.open(root, os.O_TMPFILE | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), None
    except OSError as e:
        # EOPNOTSUPP: the file system has no unnamed files; EISDIR: a kernel without O_TMPFILE
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
            raise
    path = os.path.join(root, f".bandwidth-probe.tmp-{os.getpid()}")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), path


def store_bandwidth(root: str) -> Optional[float]:
    """Bytes/s the store's file system takes durable writes at: BANDWIDTH_PROBE_BYTES written and fdatasync'ed to a
    temporary file under `root`, once per process and file system. None when it cannot be measured."""
    try:
        dev = os.stat(root).st_dev
    except OSError:
        return None
    with _measure_lock:
        if dev not in _bandwidths:
            try:
                fd, path = _probe_file(root)
                try:
                    block = os.urandom(1 << 20)  # incompressible: a compressing file system must not flatter it
                    t = time.perf_counter()
                    for _ in range(BANDWIDTH_PROBE_BYTES >> 20):
                        write_all(fd, block)
                    os.fdatasync(fd)
                    _bandwidths[dev] = BANDWIDTH_PROBE_BYTES / max(time.perf_counter() - t, 1e-6)
                finally:
                    os.close(fd)
                    if path is not None:
                        _unlink_quiet(path)
            except OSError as e:
                log.debug("cannot measure the write bandwidth of %s: %s", root, e)
                return None
        return _bandwidths[dev]


_warmed: Set[str] = set()  # store roots warm_up was asked to measure (each once per process)


def warm_up(root: str) -> Optional[threading.Thread]:
    """Measure the codec speeds and the bandwidth of the file system holding `root` now, in a daemon thread, instead
    of inside the first checkpoint that compresses (see the module docstring). The thread, or None when this root was
    asked for before. The caller's thread does not touch the store: a shared file system can hang. A checkpoint that
    needs the figures while the thread runs waits for its measurement instead of taking another."""
    with _warm_lock:
        if root in _warmed:
            return None
        _warmed.add(root)
    thread = threading.Thread(target=_warm, args=(root,), name="ckpt-measure", daemon=True)
    thread.start()
    return thread


def _warm(root: str) -> None:
    t = time.perf_counter()
    try:
        speeds = codec_speeds()
        bandwidth = store_bandwidth(root)
    except Exception as e:  # noqa: BLE001 - best effort: the first checkpoint measures again and reports
        log.debug("measuring ahead of the first checkpoint failed: %s", e)
        return
    log.debug("measured ahead of the first checkpoint in %.2f s: %s takes %s, zstd level %s chosen",
              time.perf_counter() - t, root, "unknown bytes/s" if bandwidth is None else f"{bandwidth / 1e6:.0f} MB/s",
              choose_level(bandwidth, speeds))


def choose_level(bandwidth: Optional[float], speeds: Dict[int, float], slots: int = COMPRESS_SLOTS) -> Optional[int]:
    """The best-compressing zstd level whose measured speed on `slots` cores keeps up with the store's bandwidth;
    None (store raw) when none does; level 1 when the bandwidth is unknown."""
    if not bandwidth:
        return ZSTD_LEVELS[0]
    for level in ZSTD_LEVELS:
        if speeds.get(level, 0) * slots >= bandwidth:
            return level
    return None


class WritePace:
    """Seconds per byte that one chunk worker's writes into the store take in this checkpoint: the median of the
    last PACE_WINDOW chunk files written (each its write and the start of its writeback). While the file system
    keeps up, that is the page cache's pace; once the kernel holds writers back (the dirty page limits, a Lustre
    client's dirty cache, every reclaimed node writing to the same FSx) it is the file system's share, whatever the
    probe found when the job started. A median, not a mean: a worker that waited for a CPU in the middle of a write
    (two vCPUs shared with CRIU and the hashing) is one slow write among fast ones, where a file system that holds
    writers back makes every write slow."""

    def __init__(self, window: int = PACE_WINDOW):
        self._lock = threading.Lock()
        self._recent: Deque[float] = deque(maxlen=window)

    def record(self, nbytes: int, seconds: float) -> None:
        if nbytes < PACE_MIN_BYTES:
            return
        with self._lock:
            self._recent.append(max(seconds, 0.0) / nbytes)

    @property
    def seconds_per_byte(self) -> Optional[float]:
        """None until a chunk file was timed."""
        with self._lock:
            recent = sorted(self._recent)
        return recent[len(recent) // 2] if recent else None


def paced_level(seconds_per_byte: Optional[float], speeds: Dict[int, float],
                ratios: Dict[int, float]) -> Optional[int]:
    """The zstd level that stores a byte soonest at this write pace (the time to compress it on one core plus the
    time to write what is left of it, at the ratio the level gets on netlist-like text), or None where writing the
    byte raw is sooner. For a store that no level keeps up with by its probe (choose_level gave None): it still pays
    to compress once the writes themselves slow down."""
    if not seconds_per_byte:
        return None
    best, best_cost = None, seconds_per_byte  # raw: the write alone
    for level in ZSTD_LEVELS:
        speed, ratio = speeds.get(level), ratios.get(level)
        if not speed or ratio is None:
            continue
        cost = 1 / speed + ratio * seconds_per_byte
        if cost < best_cost:
            best, best_cost = level, cost
    return best


def chunk_digest(data: bytes, algorithm: str = DEFAULT_DIGEST) -> str:
    """The name of a chunk: the hex digest of its bytes, BLAKE3 unless `algorithm` is SHA256 (the module docstring
    says why); a full all-zero chunk (untouched-but-present memory, sparse files) by a compare instead. blake3
    releases the GIL, as hashlib does, so the chunk workers hash on every core."""
    if len(data) == CHUNK_BYTES and data == ZERO_CHUNK:
        return _ZERO_DIGEST[algorithm]
    if algorithm == SHA256:
        return hashlib.sha256(data).hexdigest()
    return blake3.blake3(data).hexdigest()


def digest_matches(data: bytes, digest: str, first: str = DEFAULT_DIGEST) -> bool:
    """Whether `data` is the chunk `digest` names, by BLAKE3 or by sha256 (which named chunks before manifest format
    4, and does where checkpoint.chunk_digest says so); `first` is tried first, so only chunks named by the other hash,
    and damaged ones, cost a second hash."""
    if chunk_digest(data, first) == digest:
        return True
    return chunk_digest(data, SHA256 if first == BLAKE3 else BLAKE3) == digest


def syncfs(path: str) -> None:
    """Flush the whole file system holding `path` (one call instead of an fsync per chunk file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise StoreError(f"{path}: syncfs failed: {os.strerror(err)}")
    finally:
        os.close(fd)


class ChunkStore:
    """The chunks of one job: `known` maps digests already stored (from kept manifests) to their codec."""

    def __init__(
        self,
        root: str,
        compression: str = "zstd",
        known: Optional[Dict[str, str]] = None,
        owner: Optional[Tuple[int, int]] = None,
        digest: str = DEFAULT_DIGEST,
        writer: Optional[Callable[[int, bytes], None]] = None,
    ):
        """`writer` writes a chunk file's bytes to its descriptor (write_all by default; bench/codec_bench.py and the
        tests hold the store back with one of their own)."""
        if digest not in _ZERO_DIGEST:
            raise ValueError(f"unknown chunk digest {digest!r}")
        self.root = root
        self.digest = digest  # what names the chunks this store writes (BLAKE3 or SHA256); reads accept either
        self._dir = os.path.join(root, "")  # the root with one separator after it: chunk paths are built on it
        self.owner = owner  # (uid, gid) of an ordinary user's job the agent writes chunks for
        # ... with the user's file-system identity: chunks are the user's, and a link the user plants in the job
        # directory leads only where the user could write anyway
        self._creds = Creds(owner[0], owner[1], (owner[1],)) if owner else None
        self.compress = compression == "zstd"
        self._writer = writer or write_all
        self.known: Dict[str, str] = dict(known or {})
        self._lock = threading.Lock()
        self._pending: Dict[str, threading.Event] = {}  # digests being written by one thread right now
        self._local = threading.local()
        # digest -> whether a reused chunk must be checked before it is referenced again
        self.verify_reused: Optional[Callable[[str], bool]] = None
        # digest -> whether a checked chunk is re-read even when its file is unchanged since this process checked it
        # (None: every one); see "Checking without re-reading" above
        self.scrub: Optional[Callable[[str], bool]] = None
        self._verified: Set[str] = set()  # digests already checked (or written) in this checkpoint
        self._checked: set = set()  # prefix directories found to be real directories
        self._level: Optional[int] = None  # the zstd level, None for raw (choose_level), once `_measured`
        self._measured = False
        self.pace = WritePace()  # how fast this store's chunk files are written now (paced_level)
        self._paced_level: Optional[int] = None  # the last level paced_level chose, to log its changes
        self._speeds: Dict[int, float] = {}  # codec_speeds and codec_ratios, taken with the level (they never change)
        self._ratios: Dict[int, float] = {}

    def _check_prefix(self, prefix: str) -> None:
        """A chunk prefix directory is read only when it is a directory, not a link (checked once per store)."""
        if prefix in self._checked:
            return
        st = os.lstat(prefix)
        if not stat.S_ISDIR(st.st_mode):
            raise NotRegularFile(errno.ENOTDIR, f"{prefix} is not a directory (a symbolic link?)")
        self._checked.add(prefix)

    def path(self, ref: ChunkRef) -> str:
        return self._dir + layout.chunk_relpath(ref.digest, ref.codec)

    @property
    def level(self) -> Optional[int]:
        """The zstd level for this store on this machine, None where chunks are stored raw (choose_level; then
        paced_level may still compress some); measured at the first compression."""
        if self._level is None and not self._measured:
            with acting_as(self._creds):
                bandwidth = store_bandwidth(self.root)
            self._speeds, self._ratios = codec_speeds(), codec_ratios()
            level = choose_level(bandwidth, self._speeds)
            log.debug("zstd level %s for %s", level, self.root)
            self._level, self._measured = level, True
        return self._level

    def _compressor(self, level: Optional[int] = None) -> zstandard.ZstdCompressor:
        """This thread's compressor at `level`, by default the store's (the fastest where it stores raw)."""
        if level is None:
            level = ZSTD_LEVELS[-1] if self.level is None else self.level
        cctxs = getattr(self._local, "cctx", None)
        if cctxs is None:
            cctxs = self._local.cctx = {}
        c = cctxs.get(level)
        if c is None:
            c = cctxs[level] = zstandard.ZstdCompressor(level=level)
        return c

    def _encode(self, data: bytes, wait: bool = True) -> Tuple[bytes, str]:
        """(payload, codec). wait=False: store raw rather than wait for a free CPU (see the module docstring)."""
        if not self.compress or len(data) < 512:
            return data, CODEC_RAW
        level, max_ratio = self.level, 1 - COMPRESS_MIN_SAVING
        if level is None and data != ZERO_CHUNK:  # no level outran the store's probe: raw, unless writes slowed down
            spb = self.pace.seconds_per_byte
            level = self._pace(spb)
            if level is None:
                return data, CODEC_RAW
            # ... and only data that compresses well enough to win: compressing costs 1/speed, saves (1-ratio)*spb
            max_ratio = min(max_ratio, 1 - 1 / (self._speeds[level] * spb))
        if not _compress_slots.acquire(blocking=wait):
            return data, CODEC_RAW
        try:
            return self._compress(data, level, max_ratio)
        finally:
            _compress_slots.release()

    def _pace(self, seconds_per_byte: Optional[float]) -> Optional[int]:
        """paced_level for this store's write pace, and a log line when its choice changes."""
        level = paced_level(seconds_per_byte, self._speeds, self._ratios)
        if level != self._paced_level:
            self._paced_level = level
            log.debug("chunk writes into %s take %.0f MB/s a worker now: %s", self.root,
                      1e-6 / seconds_per_byte if seconds_per_byte else 0,
                      "stored raw" if level is None else f"compressed at zstd level {level} where it saves time")
        return level

    def _compress(self, data: bytes, level: Optional[int] = None,
                  max_ratio: float = 1 - COMPRESS_MIN_SAVING) -> Tuple[bytes, str]:
        """`data` compressed at `level` (the store's by default) where that makes it at most `max_ratio` of its size
        (its probe first: data that does not compress costs one small compression), else raw."""
        cctx = self._compressor(level)
        sample = probe(data)
        if len(sample) < len(data) and len(cctx.compress(sample)) > len(sample) * max_ratio:
            return data, CODEC_RAW
        packed = cctx.compress(data)
        if len(packed) > len(data) * max_ratio:
            return data, CODEC_RAW
        return packed, CODEC_ZSTD

    def put(self, data: bytes) -> Tuple[ChunkRef, WriteStats]:
        """Store one chunk unless the job already has it; return its reference.

        Identical chunks met by several threads at once (zero pages, repeated blocks) are written once: the first
        thread claims the digest, the others wait for it and reuse its codec.
        """
        digest = chunk_digest(data, self.digest)
        stats = WriteStats(bytes_in=len(data))
        while True:
            with self._lock:
                codec = self.known.get(digest)
                waiter = self._pending.get(digest) if codec is None else None
                if codec is None and waiter is None:
                    self._pending[digest] = threading.Event()
            if codec is not None:
                stats.chunks_reused = 1
                ref = ChunkRef(digest, len(data), codec)
                if self.verify_reused is not None and self._claim_verification(digest):
                    self._verify_or_repair(ref, data, stats)
                return ref, stats
            if waiter is None:
                break
            waiter.wait()  # then reuse what the claiming thread stored, or claim it ourselves if it failed
        ref: Optional[ChunkRef] = None
        try:
            ref, written = self._write(digest, data)
        finally:
            with self._lock:
                if ref is not None:
                    self.known[digest] = ref.codec
                self._pending.pop(digest).set()
        stats.bytes_written = written
        stats.bytes_new = len(data)
        stats.chunks_new = 1
        return ref, stats

    def claim_verification(self, digest: str) -> bool:
        """Whether a chunk reused without its data in hand (a slice, pagedelta.py) is due for re-reading in this
        checkpoint; each digest is claimed once. `unclaim` one found rotten, so the put() that stores its data
        again verifies and repairs it."""
        return self.verify_reused is not None and self._claim_verification(digest)

    def unclaim(self, digests: Iterable[str]) -> None:
        with self._lock:
            self._verified.difference_update(digests)

    def _claim_verification(self, digest: str) -> bool:
        with self._lock:
            if digest in self._verified or not self.verify_reused(digest):
                return False
            self._verified.add(digest)
            return True

    def _verify_or_repair(self, ref: ChunkRef, data: bytes, stats: WriteStats) -> None:
        """Compare the stored chunk with `data` (whose digest it claims); rewrite it from `data` when it differs."""
        stats.chunks_verified = 1
        if self._stored_equals(ref, data):
            return
        log.warning("chunk %s (%s) does not match its digest: rewriting it from the fresh data",
                    ref.digest[:16], self.path(ref))
        payload = self._compressor().compress(data) if ref.codec == CODEC_ZSTD else data  # same name, same codec
        stats.bytes_written += self._write_file(ref, payload, replace=True)
        stats.chunks_repaired = 1

    def unchanged_since_checked(self, ref: ChunkRef) -> bool:
        """Whether a chunk due for checking may be trusted without a re-read: `scrub` does not pick it, and its file
        stats exactly as when this process last wrote it or found it whole."""
        if self.scrub is None or self.scrub(ref.digest):
            return False
        try:
            with acting_as(self._creds):
                st = os.lstat(self.path(ref))
        except OSError:
            return False
        return CHECKED.unchanged(self.root, ref, st)

    def intact(self, ref: ChunkRef, where: str = "") -> bool:
        """Whether a stored chunk is whole (checked by its stat or re-read, see unchanged_since_checked), for a
        chunk reused without its data in hand; a missing or damaged one is not."""
        if self.unchanged_since_checked(ref):
            return True
        try:
            self.get(ref, where)
        except DamagedCheckpointError:
            return False
        return True

    def rotten(self, refs: Iterable[ChunkRef], pool: concurrent.futures.Executor, where: str = "") -> Set[str]:
        """The digests of those of `refs` that are not intact (intact()), checked by the pool in CHECK_BATCHES
        batches: a pool task per chunk cost about 30 us of the pool's own work where the check itself (a stat and a
        lookup) takes 6 (measured on the dev VM; a 500 GiB job reuses half a million chunks), while the batches
        still overlap the store's latency as the workers do."""
        refs = list(refs)
        if not refs:
            return set()
        size = -(-len(refs) // CHECK_BATCHES)

        def check(batch: List[ChunkRef]) -> List[str]:
            return [r.digest for r in batch if not self.intact(r, where)]

        return {d for bad in pool.map(check, [refs[i:i + size] for i in range(0, len(refs), size)]) for d in bad}

    def _stored_equals(self, ref: ChunkRef, data: bytes) -> bool:
        """Whether the stored chunk holds exactly `data`: anything unreadable, misplaced or different is rotten."""
        if self.unchanged_since_checked(ref):
            return True
        bound = ref.size + (ZSTD_SLACK_BYTES if ref.codec == CODEC_ZSTD else 0)
        try:
            with acting_as(self._creds):
                payload, st = read_regular_stat(self.path(ref), bound)
        except OSError:
            return False
        if ref.codec == CODEC_ZSTD:
            try:
                payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=ref.size)
            except zstandard.ZstdError:
                return False
        if payload != data:
            return False
        CHECKED.record(self.root, ref, st)
        return True

    def _write(self, digest: str, data: bytes) -> Tuple[ChunkRef, int]:
        payload, codec = self._encode(data, wait=False)
        ref = ChunkRef(digest, len(data), codec)
        with self._lock:
            self._verified.add(digest)
        final = self.path(ref)
        with acting_as(self._creds):
            if os.path.exists(final):
                return ref, 0
            return ref, self._write_file(ref, payload)

    def _write_file(self, ref: ChunkRef, payload: bytes, replace: bool = False) -> int:
        """Write a chunk file under a temporary name, then rename it into place (over a rotten one: `replace`),
        with the user's file-system identity when acting for a user's job; its stat after the rename is recorded
        (CHECKED)."""
        final = self.path(ref)
        tmp = f"{final}.tmp-{os.getpid()}-{threading.get_ident()}"
        with acting_as(self._creds):
            try:
                prefix_dir = os.path.dirname(final)
                if not os.path.isdir(prefix_dir):
                    os.makedirs(prefix_dir, mode=0o700, exist_ok=True)
                # never write through a link planted under the temp name
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
                try:
                    started = time.perf_counter()
                    self._writer(fd, payload)
                    start_writeback(fd)
                    self.pace.record(len(payload), time.perf_counter() - started)
                    os.rename(tmp, final)  # over a rotten chunk, or a link planted in its place, not through it
                    st = os.fstat(fd)  # after the rename, which sets the ctime: any later write changes it again
                finally:
                    os.close(fd)
                CHECKED.record(self.root, ref, st)
            except OSError as e:  # a full or read-only store: name the chunk, leave no temporary file behind
                _unlink_quiet(tmp)
                raise StoreError(f"cannot write chunk {final}: {e.strerror or e}") from e
        return len(payload)

    def get(self, ref: ChunkRef, where: str = "") -> bytes:
        """Read, decompress and verify one chunk; DamagedCheckpointError names what is wrong."""
        path = self.path(ref)
        label = f"{where}: " if where else ""
        # a regular file of the size the manifest records, never a link, FIFO or device put in its place
        bound = ref.size + (ZSTD_SLACK_BYTES if ref.codec == CODEC_ZSTD else 0)
        try:
            self._check_prefix(os.path.dirname(path))
            payload, st = read_regular_stat(path, bound)
        except OSError as e:
            raise self._read_error(e, ref, label, path) from None
        return self._decode_checked(ref, payload, st, label, path)

    def get_direct(self, ref: ChunkRef, where: str, buffers: ReadBuffers) -> Tuple[Any, Optional[ReadBuffer]]:
        """get(), the file read around the page cache into one of `buffers` (safeio.read_regular_direct), for
        chunks read once, as a restore reads them: (the chunk's bytes, the buffer holding them, for the caller to
        give back once done with them; None when they are a bytes object of their own: decompressed, or read
        through the page cache where the file system refuses O_DIRECT)."""
        if not buffers.direct:
            return self.get(ref, where), None
        path = self.path(ref)
        label = f"{where}: " if where else ""
        bound = ref.size + (ZSTD_SLACK_BYTES if ref.codec == CODEC_ZSTD else 0)
        buf = buffers.take()
        try:
            self._check_prefix(os.path.dirname(path))
            n, st = read_regular_direct(path, bound, buf)
        except DirectIOUnsupported:
            buffers.give(buf)
            buffers.direct = False
            log.debug("%s refuses O_DIRECT: chunks are read through the page cache", self.root)
            return self.get(ref, where), None
        except OSError as e:
            buffers.give(buf)
            raise self._read_error(e, ref, label, path) from None
        try:
            data = self._decode_checked(ref, memoryview(buf)[:n], st, label, path)
        except BaseException:
            buffers.give(buf)
            raise
        if ref.codec == CODEC_ZSTD:  # decompressed into bytes of their own
            buffers.give(buf)
            return data, None
        return data, buf

    @staticmethod
    def _read_error(e: OSError, ref: ChunkRef, label: str, path: str) -> Exception:
        if isinstance(e, FileNotFoundError):
            return DamagedCheckpointError(f"{label}chunk {ref.digest[:16]} is missing ({path})")
        if isinstance(e, NotRegularFile):
            return DamagedCheckpointError(f"{label}chunk {ref.digest[:16]}: {e.strerror}")
        return StoreError(f"{label}cannot read chunk {path}: {e.strerror}")

    def _decode_checked(self, ref: ChunkRef, payload, st: os.stat_result, label: str, path: str):
        """The chunk's bytes from its file's `payload`, decompressed and checked against its digest."""
        if ref.codec == CODEC_ZSTD:
            try:
                data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=ref.size)
            except zstandard.ZstdError as e:
                raise DamagedCheckpointError(f"{label}chunk {ref.digest[:16]} is corrupt ({path}): {e}") from e
        else:
            data = payload
        if len(data) != ref.size or not digest_matches(data, ref.digest, self.digest):
            CHECKED.forget(self.root, ref)
            raise DamagedCheckpointError(f"{label}chunk {ref.digest[:16]} fails its checksum ({path})")
        CHECKED.record(self.root, ref, st)
        return data


class ReadBuffer(mmap.mmap):
    """A page-aligned buffer a chunk is read into, and where it lies in memory (`address`, for vmsplice)."""

    address: int


class ReadBuffers:
    """Page-aligned buffers a chunk is read into around the page cache (ChunkStore.get_direct), reused: a fresh
    buffer costs its page faults, as much as the page cache it saves. `direct` turns False once the store's file
    system refuses O_DIRECT."""

    KEEP = 64  # idle buffers kept for reuse at most

    def __init__(self, max_chunk: int = CHUNK_BYTES + ZSTD_SLACK_BYTES):
        self.size = direct_buffer_bytes(max_chunk)
        self.direct = True
        self._idle: List[ReadBuffer] = []

    def take(self) -> ReadBuffer:
        try:
            return self._idle.pop()
        except IndexError:
            buf = ReadBuffer(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            buf.address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            return buf

    def give(self, buf: Optional[ReadBuffer]) -> None:
        """Back for reuse: nothing may read it any more."""
        if buf is not None and len(self._idle) < self.KEEP:
            self._idle.append(buf)


def file_ranges(size: int, cuts: Optional[Iterable[int]] = None) -> List[Tuple[int, int]]:
    """Split [0, size) into chunk ranges: at the given cut offsets if any, and at most CHUNK_BYTES long."""
    points = sorted({c for c in (cuts or ()) if 0 < c < size})
    ranges = []
    start = 0
    for end in points + [size]:
        while end - start > CHUNK_BYTES:
            ranges.append((start, start + CHUNK_BYTES))
            start += CHUNK_BYTES
        if end > start:
            ranges.append((start, end))
            start = end
    return ranges


def store_file(
    chunks: ChunkStore,
    path: str,
    pool: concurrent.futures.Executor,
    cuts: Optional[Iterable[int]] = None,
) -> Tuple[List[ChunkRef], WriteStats, int]:
    """Chunk one file into the store in parallel; return its chunk list, stats and size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        ranges = file_ranges(size, cuts)

        def one(rng: Tuple[int, int]) -> Tuple[ChunkRef, WriteStats]:
            start, end = rng
            data = os.pread(fd, end - start, start)
            if len(data) != end - start:
                raise StoreError(f"{path}: changed size while being stored")
            return chunks.put(data)

        results = list(pool.map(one, ranges))
    finally:
        os.close(fd)
    total = WriteStats()
    refs = []
    for ref, st in results:
        refs.append(ref)
        total.add(st)
    return refs, total, size


def restore_file(
    chunks: ChunkStore,
    refs: Sequence[ChunkRef],
    dest: str,
    pool: concurrent.futures.Executor,
    mode: int = 0o600,
    where: str = "",
    dir_fd: Optional[int] = None,
    slices: Optional[Sequence[Sequence[int]]] = None,
) -> None:
    """Write a file from its chunks (verified) to `dest` via a temporary name, with exactly `mode`.
    `dir_fd`: `dest` is a name in that directory (opened by the caller without following links).
    `slices`: the file is these [chunk index, offset, length] pieces of `refs` in order (a page-granular delta
    image, pagedelta.py), each chunk read once, instead of the chunks one after the other."""
    if slices is None:
        slices = [(i, 0, ref.size) for i, ref in enumerate(refs)]
    # chunk index -> [(file offset, offset in chunk, length)]
    wanted: Dict[int, List[Tuple[int, int, int]]] = {}
    pos = 0
    for idx, off, length in slices:
        wanted.setdefault(idx, []).append((pos, off, length))
        pos += length
    tmp = f"{dest}.ckpt-tmp-{os.getpid()}"
    # the name is predictable: never open through whatever already sits there (a link planted to another file)
    _unlink_quiet(tmp, dir_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        os.ftruncate(fd, pos)

        def one(item: Tuple[int, List[Tuple[int, int, int]]]) -> None:
            idx, pieces = item
            ref = refs[idx]
            if ref.all_zero():
                return  # leave all-zero chunks as holes: restored sparse files stay sparse
            data = chunks.get(ref, where or dest)
            view = memoryview(data)
            for file_off, off, length in pieces:
                os.pwrite(fd, view[off:off + length], file_off)

        for _ in pool.map(one, wanted.items()):
            pass
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp, dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, dest, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def verify_refs(chunks: ChunkStore, refs: Iterable[ChunkRef], pool: concurrent.futures.Executor, where: str) -> None:
    for _ in pool.map(lambda r: chunks.get(r, where), refs):
        pass


def iter_chunk_files(root: str) -> Iterator[Tuple[str, str]]:
    """(digest, path) of every chunk file under root, without following symbolic links."""
    try:
        prefixes = list(os.scandir(root))
    except FileNotFoundError:
        return
    for prefix in prefixes:
        if not prefix.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(prefix.path):
            if not entry.is_file(follow_symlinks=False):
                continue
            yield layout.digest_of_chunk_name(entry.name) or "", entry.path


def _prefix_dirs(chunks_fd: int, prefixes: Iterable[str]) -> Iterator[Tuple[str, int]]:
    """(prefix, its fd) for each of these prefix directories of the chunk directory open at `chunks_fd` that is a
    directory of two characters' name, opened without following a link (one replaced by a link is passed over).
    Each fd is closed once the caller moves on (or stops)."""
    for prefix in prefixes:
        prefix_fd = open_dir_nofollow(prefix, chunks_fd) if len(prefix) == 2 else None
        if prefix_fd is None:
            continue
        try:
            yield prefix, prefix_fd
        finally:
            os.close(prefix_fd)


def present_chunks(chunks_fd: int, wanted: Dict[str, str]) -> Dict[str, str]:
    """The digests (-> codec) of `wanted` whose chunk file is in the chunk directory open at `chunks_fd`: one
    listing per prefix directory and no stat of any chunk. On Lustre a listing asks only the metadata server, where
    a stat of each chunk would also ask the object servers for its size: a job of 500 GiB has half a million
    chunks. A prefix directory replaced by a link is not entered (nothing in it is present)."""
    by_prefix: Dict[str, List[str]] = {}
    for digest in wanted:
        by_prefix.setdefault(digest[:2], []).append(digest)
    present: Dict[str, str] = {}
    for prefix, prefix_fd in _prefix_dirs(chunks_fd, sorted(by_prefix)):
        names = set(scandir_names(prefix_fd))
        present.update((d, wanted[d]) for d in by_prefix[prefix] if layout.chunk_name(d, wanted[d]) in names)
    return present


def sweep_chunk_dir(
    chunks_fd: int, referenced: Set[str], unlink: Optional[Callable[[int, str, int], None]] = None
) -> Tuple[int, int]:
    """Remove every regular file below the chunk directory open at `chunks_fd` that is no chunk of a digest in
    `referenced` (under any codec's suffix, layout.CODEC_SUFFIXES): unreferenced chunks, temporary files of
    interrupted writes, anything else planted there. Returns (files removed, bytes freed).

    Every directory is opened relative to its parent without following a symbolic link, so a prefix directory
    replaced by a link to somewhere else is never entered. `unlink(dir_fd, name, size)` removes (or only counts,
    for `ckpt gc --dry-run`) one file."""
    if unlink is None:
        def unlink(dir_fd: int, name: str, size: int) -> None:
            os.unlink(name, dir_fd=dir_fd)
    removed = freed = 0
    for _prefix, prefix_fd in _prefix_dirs(chunks_fd, scandir_names(chunks_fd)):
        for name in scandir_names(prefix_fd):
            digest = layout.digest_of_chunk_name(name)
            if digest and digest in referenced:
                continue
            try:
                st = os.stat(name, dir_fd=prefix_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                unlink(prefix_fd, name, st.st_size)
            except OSError:
                continue
            removed += 1
            freed += st.st_size
    return removed, freed


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (a short write goes on where it stopped); an OSError otherwise."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unlink_quiet(path: str, dir_fd: Optional[int] = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass
