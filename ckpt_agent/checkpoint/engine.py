"""Take and restore checkpoints of one job step: CRIU images plus captured files, into the store.

Checkpoint, numbered plan:
  1. reserve the next generation (a partial directory) under the job's shared lock;
  2. `criu dump --leave-stopped`, streamed into the store as it is dumped (streamdump.py; step 5 is then done
     here), else into a staging directory: the tree is frozen from here on;
  3. capture the working directory, extra paths and every file open for writing (incremental);
  4. periodic: let the tool run again (SIGCONT) — it was frozen only for steps 2 and 3; a process the job had
     stopped itself stays stopped (CRIU's core image says so: _held);
  5. chunk the images into the store (only new chunks are written, compressed where it pays);
  6. commit: sync the file system, write the manifest last, rename the generation into place;
  7. final: kill the tree once the commit is durable; on any failure before that, the tool resumes instead;
  8. drop generations beyond `keep` and chunks nothing references any more.

A checkpointer that dies mid-checkpoint (SIGKILL) never leaves the tool stopped: a guard process started before the
dump (dumpguard.py) outlives it and resumes the tree (or kills it, once a final checkpoint is committed) and removes
the staging images; staging directories of dead checkpointers are also swept at the next start (`sweep_staging`).
Chunks a checkpoint reuses are verified against their digest and rewritten from the fresh data when rotten: each
periodic checkpoint re-reads a rotating 1/SCRUB_SLICES of them; a final checkpoint checks every one by a stat that
shows whether its file changed since this process wrote it or found it whole (chunks.py, CHECKED), and re-reads
only those (reuse_checks).
Every store failure is a StoreError (exit 74) naming the path.

Restore: newest generation first, falling back to older ones when one is damaged; images are rebuilt from
verified chunks, files are put back, the CPU is checked, then `criu restore -d -S` with the new stdio pipes. With
dirty tracking the tree is restored stopped (--leave-stopped) and armed before it runs (_track_restored), so its
first checkpoint sends only the pages written since the restore.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ckpt_agent.adapters.criu import CORE_IMAGE, Criu, pages_cut_points, pages_runs, stopped_tasks
from ckpt_agent.checkpoint import capture, streamdump
from ckpt_agent.errors import (
    CkptError,
    DamagedCheckpointError,
    NotFoundError,
    PermissionDenied,
    StoreError,
)
from ckpt_agent.node.config import CheckpointSettings
from ckpt_agent.store import pagedelta
from ckpt_agent.store.chunks import (
    CHUNK_BYTES,
    WORKERS,
    WriteStats,
    restore_file,
    store_file,
    warm_up,
)
from ckpt_agent.store.generations import (
    CheckpointStore,
    Generation,
    iso,
    utcnow,
)
from ckpt_agent.store.manifest import FORMAT_VERSION, ImageEntry, Manifest, Stats
from ckpt_agent.util.usercreds import Creds, acting_as

log = logging.getLogger(__name__)

SHM_HEADROOM_BYTES = 512 << 20  # keep this much RAM free beyond the images when staging them in tmpfs
SHM_STAGING, DISK_STAGING = "/dev/shm/ckpt-agent", "/var/tmp/ckpt-agent"  # images in RAM when it fits, else disk
STAGING_BASES = (SHM_STAGING, DISK_STAGING)  # where dump images are staged (staging_dir "auto")
_DUMP_STAGE_RE = re.compile(r"^dump\.(\d+)\.")  # dump.<checkpointer pid>.<job>.<step>.<random>
# a periodic checkpoint re-reads the reused chunks whose digest falls in one of this many slices, in turn: every
# chunk at rest is re-read at least once per SCRUB_SLICES periodic checkpoints, at 1/SCRUB_SLICES of the cost of
# re-reading them all; a final checkpoint checks them all by their stat (reuse_checks; bench/verify_bench.py)
SCRUB_SLICES = 8
DUMPGUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dumpguard.py")
GUARD_EXIT_WAIT_SECONDS = 10  # the guard exits as soon as it reads our verdict; this only bounds a wedged one


def reuse_checks(number: int, final: bool) -> Tuple[Callable[[str], bool], Optional[Callable[[str], bool]]]:
    """How checkpoint `number` checks the chunks it reuses (ChunkStore.verify_reused, ChunkStore.scrub).

    A periodic checkpoint re-reads the chunks whose digest falls in its slice (1/SCRUB_SLICES of them, in turn) and
    checks no other. A final checkpoint, the one a resume will use, checks every reused chunk by its stat against
    what this process wrote or read back whole (chunks.py, CHECKED) and re-reads only those that stat otherwise or
    that it never saw: it is on the notice's deadline, where its slice of a 500 GiB job would be 62 GiB read back
    from the shared file system while every reclaimed node writes to it."""
    if final:
        return (lambda _d: True), (lambda _d: False)
    return (lambda d: int(d[:2], 16) % SCRUB_SLICES == number % SCRUB_SLICES), None


@dataclass
class JobState:
    """What the engine needs to know about a running job step."""

    job_id: str
    step: str
    init_pid: int  # host pid of the namespace init (the root of the dumped tree)
    cwd: str
    argv: List[str]
    pipe_inodes: Dict[str, int]  # "stdout"/"stderr"/"status" -> inode of the pipe the tree writes to
    uid: int = 0
    gid: int = 0
    groups: Tuple[int, ...] = ()  # the user's supplementary groups (what the agent reads the user's files with)
    exclude: Set[str] = field(default_factory=set)
    node: str = ""
    instance: Dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointResult:
    generation: int
    final: bool
    reason: str
    bytes_in: int
    bytes_written: int
    bytes_new: int
    frozen_seconds: float
    total_seconds: float
    created: str
    pages_unchanged: int = 0  # pages dirty tracking found not written since the previous checkpoint (not sent)


@dataclass
class RestoreResult:
    pid: int
    generation: int
    created: str
    skipped: List[Tuple[int, str]]  # damaged generations passed over: (number, why)
    seconds: float
    files_written: int


NS_INIT_PID = 1  # the job's namespace init (nsinit.py), the root of the tree CRIU dumps, in its own namespace


def _resume(pids: List[int], held: Set[int] = frozenset()) -> None:
    """Let the tree CRIU left stopped run again, but the processes in `held`: those the job had stopped itself."""
    for pid in pids:
        if pid in held:
            continue
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _held(vpids: Sequence[int], pids: List[int]) -> Set[int]:
    """Host pids (of `pids`, the tree's) of the processes CRIU recorded as stopped (`vpids`, stopped_tasks() of the
    core images, pids in the tree's namespace): stopped by the job itself (SIGSTOP, SIGTSTP), which a restore leaves
    stopped and so must the resume after a dump."""
    if not vpids:
        return set()
    by_vpid = capture.by_ns_pid(pids)  # a process gone, or whose status cannot be read, is left out: it runs
    held = {by_vpid[v] for v in vpids if v in by_vpid}
    log.debug("processes the job stopped itself stay stopped: %s", sorted(held))
    return held


def _core_images_in(images_dir: str) -> Dict[str, bytes]:
    """The core-N.img images of a dump or restore staged in `images_dir` (a few KiB a thread)."""
    out: Dict[str, bytes] = {}
    try:
        names = os.listdir(images_dir)
    except OSError:
        return out
    for name in names:
        if CORE_IMAGE.match(name):
            try:
                with open(os.path.join(images_dir, name), "rb") as fh:
                    out[name] = fh.read()
            except OSError:
                continue
    return out


def _kill(init_pid: int) -> None:
    try:
        os.kill(init_pid, signal.SIGKILL)  # the namespace dies with its init
    except ProcessLookupError:
        pass


class DumpGuard:
    """The checkpointer's side of dumpguard.py: start it before the dump, then tell it the outcome."""

    RESUMED = b"R"  # the tree runs again (or is dead): nothing to undo
    KILL = b"K"  # a final checkpoint is committed: should we die now, the tree must die too, not run on

    def __init__(self, init_pid: int, staging: str):
        try:
            pid_ns = os.readlink(f"/proc/{init_pid}/ns/pid")
        except OSError as e:
            raise NotFoundError(f"process {init_pid} is not running: {e.strerror}") from e
        r, self.fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", DUMPGUARD, str(r), str(init_pid), pid_ns, staging],
                pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
            )
        except OSError:
            os.close(self.fd)
            raise
        finally:
            os.close(r)

    def tell(self, verdict: bytes) -> None:
        try:
            os.write(self.fd, verdict)
        except OSError:
            pass

    def hold(self, pids: Set[int]) -> None:
        """Processes the job had stopped itself: should we die, the guard lets them be, as _resume does."""
        if pids:
            self.tell(b"H" + b",".join(str(p).encode() for p in sorted(pids)) + b";")

    def close(self) -> None:
        self.tell(self.RESUMED)
        os.close(self.fd)
        try:
            self.proc.wait(timeout=GUARD_EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("dump guard %d did not exit", self.proc.pid)


def sweep_staging(bases) -> List[str]:
    """Remove dump staging directories whose checkpointer is dead (it was killed): images in /dev/shm are RAM."""
    removed = []
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            m = _DUMP_STAGE_RE.match(name)
            path = os.path.join(base, name)
            if not m or _pid_alive(int(m.group(1))) or os.path.islink(path):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            log.info("removed %s, staging images of a checkpointer that died", path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def machine_facts(criu: Criu) -> Dict[str, Any]:
    return {
        "criu_version": criu.version(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "host": socket.gethostname(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Engine:
    def __init__(self, criu: Criu, store: CheckpointStore, settings: CheckpointSettings):
        self.criu = criu
        self.store = store
        self.settings = settings
        # dirty tracking (adapters/uffd.py, else adapters/softdirty.py): the tracker, made at first use (False: not
        # here), and per (job, step) the generation whose dump armed the tree: (number, created, pid)
        self._tracker: Any = None
        self._armed: Dict[Tuple[str, str], Tuple[int, str, int]] = {}
        self._cleanups: List[threading.Thread] = []  # cleanups of final checkpoints, after their reply
        self._cleanups_lock = threading.Lock()

    def _dirty_tracker(self):
        """The dirty tracker, or None where this kernel, CPU architecture or CRIU build cannot track written pages,
        or where no dump could send only the written pages (`checkpoint.stream: off`, or a CRIU without `--stream`):
        arming would then cost the tool a fault at its first write to each page, and a restore its --leave-stopped
        wait, for nothing. userfaultfd's async write-protection where the kernel has it (adapters/uffd.py), else
        soft-dirty bits (adapters/softdirty.py: the 5.x and 6.1 kernels of today's cluster nodes)."""
        if self._tracker is None:
            self._tracker = False
            if (self.settings.dirty_tracking and streamdump.allowed(self.settings, self.criu)
                    and self.criu.can_dump_written_only()):
                from ckpt_agent.adapters import softdirty, uffd  # noqa: PLC0415 - only where a checkpoint is taken

                if self.criu.can_dump_uffd_written() and uffd.DirtyTracker.supported():
                    self._tracker = uffd.DirtyTracker()
                elif self.criu.can_dump_soft_dirty_written() and softdirty.SoftDirtyTracker.supported():
                    self._tracker = softdirty.SoftDirtyTracker()
        return self._tracker or None

    def _written_only(self, job: JobState, previous: Optional[Manifest], stage: str,
                      tracked_since: Optional[int] = None) -> bool:
        """Whether this dump may send only the pages written since `previous`: its dump write-protected this very
        tree (same init pid), and nothing since (an armed record is used once: every dump arms anew)."""
        armed = self._armed.pop((job.job_id, job.step), None)
        if armed is None or previous is None or self._dirty_tracker() is None:
            return False
        if armed != (previous.generation, previous.created, job.init_pid):
            return False
        if self._dirty_tracker().MARKS_INHERITED and tracked_since is None:  # soft-dirty: see _tracked_since
            return False
        return streamdump.stream_written_only(self.settings, self.criu, stage, previous)

    def _tracked_since(self, job: JobState) -> Optional[int]:
        """For soft-dirty tracking (whose marks fork() copies): when the tree's arming began, which the dump needs to
        read every page of a process started since (adapters/softdirty.py). None for userfaultfd tracking."""
        tracker = self._dirty_tracker()
        if tracker is None or not tracker.MARKS_INHERITED:
            return None
        return tracker.tracked_since(job.init_pid)

    def _arm(self, pids: List[int], restored: bool = False) -> bool:
        """Write-protect the stopped tree's pages, so that the next dump finds the pages written since."""
        tracker = self._dirty_tracker()
        if tracker is None or not pids:
            return False
        outcome = tracker.arm(pids, restored=restored)
        failed = {pid: why for pid, why in outcome.items() if why != "armed"}
        if failed:
            log.debug("dirty tracking not armed for %s", failed)
        return len(failed) < len(outcome)

    def warm_up(self) -> Optional[threading.Thread]:
        """When a job starts or is restored on this node: measure what the first compressing checkpoint needs (the
        codec speeds, the store's bandwidth) in the background, not inside that checkpoint (store/chunks.py)."""
        if self.settings.compression != "zstd":
            return None
        return warm_up(self.store.root)

    # --- checkpoint ---------------------------------------------------------------------------------------------
    def sweep_staging(self) -> List[str]:
        bases = list(STAGING_BASES)
        if self.settings.staging_dir != "auto":
            bases.append(self.settings.staging_dir)
        return sweep_staging(bases)

    def checkpoint(
        self, job: JobState, *, final: bool, reason: str, timeout: Optional[float] = None
    ) -> CheckpointResult:
        try:
            return self._checkpoint(job, final=final, reason=reason, timeout=timeout)
        except OSError as e:  # a full, read-only or vanished store (or staging area): 74, naming the path
            where = e.filename or self.store.job_dir(job.job_id)
            raise StoreError(f"checkpoint of job {job.job_id} step {job.step}: {where}: {e.strerror or e}") from e

    def _checkpoint(self, job: JobState, *, final: bool, reason: str, timeout: Optional[float]) -> CheckpointResult:
        t0 = time.monotonic()
        store = self.store
        store.ensure_job(job.job_id, job.step, job.uid, job.gid)
        owner = (job.uid, job.gid) if job.uid != 0 and os.geteuid() == 0 else None
        # The root agent touches a user's job directory (which the user can fill with links) only as the user.
        user = Creds(job.uid, job.gid, tuple(job.groups) or (job.gid,)) if owner else None
        guard: Optional[DumpGuard] = None
        with contextlib.ExitStack() as held, concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            with acting_as(user):
                held.enter_context(store.job_lock(job.job_id))
                number, partial = store.begin(job.job_id, job.step)
            previous = self._previous_manifest(job, signed_only=owner is not None)
            chunks = store.chunks_for(job.job_id, self.settings.compression, store.known_chunks(job.job_id), owner,
                                      self.settings.chunk_digest)
            chunks.verify_reused, chunks.scrub = reuse_checks(number, final)
            stage = self._staging_dir(job)
            stopped: List[int] = []
            held: Set[int] = set()  # of `stopped`, those the job had stopped itself: left so
            resumed = False
            timings: Dict[str, float] = {"prepare_seconds": time.monotonic() - t0}  # where a checkpoint's time goes
            try:
                guard = DumpGuard(job.init_pid, stage)
                t_step = time.monotonic()
                tracked_since = self._tracked_since(job)  # soft-dirty tracking's arming time, for this dump
                written_only = self._written_only(job, previous, stage, tracked_since)
                tracker = self._dirty_tracker()
                compare_written = tracker is not None and tracker.WHOLE_HUGE_PAGES  # soft-dirty: 2 MiB marks
                checked = WriteStats()  # chunk checks of a written-only dump given up for a full one
                while True:
                    streamed = streamdump.begin(self.settings, self.criu, chunks, pool, stage, previous,
                                                staged_in_ram=stage.startswith(SHM_STAGING + os.sep), final=final,
                                                written_only=written_only, compare_written=compare_written)
                    try:  # streamed: the images enter the store while CRIU dumps (no staging copy)
                        self.criu.dump(
                            job.init_pid, stage, leave_stopped=True, tcp_close=self.settings.tcp_close,
                            ghost_limit=self.settings.ghost_limit, timeout=timeout, keep_fds=(guard.fd,),
                            stream=streamed is not None, written_only=written_only,
                            tracked_since_us=tracked_since if written_only else None,
                        )
                    except BaseException as e:
                        cause = streamed.abort() if streamed is not None else None
                        if cause is not None and isinstance(e, CkptError):  # the store made CRIU fail: name it
                            raise cause from e
                        raise
                    if streamed is not None:  # every page read out of CRIU's pipes, which may hold the tool's own
                        streamed.drain()      # pages (vmsplice) until then: before the tool may run again
                    timings["dump_seconds"] = time.monotonic() - t_step
                    t_step = time.monotonic()
                    stopped = capture.ns_pids(job.init_pid)
                    held = _held(stopped_tasks(streamed.core_images() if streamed is not None
                                               else _core_images_in(stage)), stopped)
                    guard.hold(held)
                    open_files = capture.open_writable_files(stopped)
                    roots = [job.cwd] + list(self.settings.extra_paths)
                    exclude = set(job.exclude) | {store.root, stage, os.path.dirname(stage)}
                    prev_files = {e.path: e for e in previous.files} if previous else {}
                    with acting_as(user):  # never read, as root, what a link swapped in by the user points to
                        files, fstats = capture.capture(chunks, pool, roots, open_files, exclude, prev_files,
                                                        owner_uid=job.uid if owner else None)
                    timings["capture_seconds"] = time.monotonic() - t_step
                    armed = False
                    if not final:  # before the tool runs again: its next write to any page is then seen
                        t_step = time.monotonic()
                        armed = self._arm(stopped)
                        timings["arm_seconds"] = time.monotonic() - t_step
                    t_frozen = time.monotonic() - t0
                    if not final:
                        # the tool runs again while the page tables are made and stored (a staged dump's images are
                        # stored after this point too)
                        _resume(stopped, held)
                        resumed = True
                        guard.tell(DumpGuard.RESUMED)
                    t_step = time.monotonic()
                    try:
                        stored = streamed.finish() if streamed is not None else None
                        unchanged = streamed.pages_unchanged if streamed is not None else 0
                    except streamdump.ParentPagesMissing as e:
                        if not written_only:
                            raise
                        # dump it again, every page, with its files (rare: a rotten old chunk); a final's tree is
                        # resumed first, since CRIU records a stopped task as stopped and the restored tool would
                        # never run; a periodic one's runs already, and the next dump gets a guard of its own
                        log.warning("checkpoint of job %s: %s; dumping every page instead", job.job_id, e)
                        written_only = False
                        checked.add(streamed.checks())
                        if resumed:
                            guard.close()
                            guard = DumpGuard(job.init_pid, stage)
                            resumed = False
                        else:
                            _resume(stopped, held)
                        t_step = time.monotonic()
                        continue
                    break
                # since t_step: a streamed dump's last chunks and page tables (finish), or a staged one's images
                images, istats = stored or self._store_images(chunks, pool, stage, previous)
                timings["store_images_seconds"] = time.monotonic() - t_step
                stats = WriteStats()
                stats.add(fstats)
                stats.add(istats)
                stats.add(checked)
                created = iso(utcnow())
                manifest = Manifest(
                    format=FORMAT_VERSION, job_id=job.job_id, step=job.step, generation=number, created=created,
                    final=final, reason=reason, machine=machine_facts(self.criu), node=job.node,
                    instance=job.instance, cwd=job.cwd, argv=job.argv, uid=job.uid, gid=job.gid,
                    pipes=job.pipe_inodes, images=images, files=files,
                    stats=Stats(**dataclasses.asdict(stats), seconds={
                        "frozen_seconds": round(t_frozen, 3), **{k: round(v, 3) for k, v in timings.items()}},
                        extra={"streamed": streamed is not None,
                               **({"pages_unchanged": unchanged} if unchanged else {})}),
                )
                with acting_as(user):
                    store.commit(partial, number, manifest, owner)
                if armed:
                    self._armed[(job.job_id, job.step)] = (number, created, job.init_pid)
                if final:
                    guard.tell(DumpGuard.KILL)
            except BaseException as e:
                with acting_as(user):
                    store.abort(partial)
                if not resumed:  # a failed checkpoint never costs the running tool anything, even a failed dump
                    _resume(stopped or capture.ns_pids(job.init_pid), held)
                if guard is not None:
                    guard.close()
                if isinstance(e, OSError):
                    raise StoreError(f"checkpoint {number} of job {job.job_id} step {job.step}: "
                                     f"{e.filename or partial}: {e.strerror or e}") from e
                raise
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        if final:
            _kill(job.init_pid)
        guard.close()
        if final:  # the reply, and the requeue after it, never wait for the store's cleanup (a shared FS can hang)
            self._clean_up_later(job, user, number)
        else:
            self._clean_up(job, user, number)
        return CheckpointResult(
            generation=number, final=final, reason=reason, bytes_in=stats.bytes_in,
            bytes_written=stats.bytes_written, bytes_new=stats.bytes_new, frozen_seconds=t_frozen,
            total_seconds=time.monotonic() - t0, created=created, pages_unchanged=unchanged,
        )

    def _clean_up(self, job: JobState, user: Optional[Creds], number: int) -> None:
        """After checkpoint `number` committed: older generations beyond checkpoint.keep and the chunks no manifest
        references any more go."""
        try:
            with acting_as(user):
                self.store.prune(job.job_id, job.step, self.settings.keep)
                self.store.sweep_chunks(job.job_id)
        except (OSError, CkptError) as e:  # the checkpoint is committed; gc reclaims what is left
            log.warning("checkpoint %d of job %s committed, but cleaning up older ones failed: %s", number,
                        job.job_id, e)

    def _clean_up_later(self, job: JobState, user: Optional[Creds], number: int) -> None:
        """_clean_up in a thread of its own (acting_as is per thread): after a final checkpoint, the listing and
        unlinking of the job's chunks on the store's file system come after the reply, not before it. Cut short
        (the process exits first), the next checkpoint of the job or `ckpt gc` does what is left."""
        worker = threading.Thread(target=self._clean_up, args=(job, user, number), daemon=True,
                                  name=f"cleanup-{job.job_id}-{job.step}")
        with self._cleanups_lock:
            self._cleanups = [t for t in self._cleanups if t.is_alive()] + [worker]
        worker.start()

    def wait_cleanups(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds in all for the cleanups of final checkpoints; False if one still runs."""
        deadline = time.monotonic() + timeout
        with self._cleanups_lock:
            workers = list(self._cleanups)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in workers)

    def _previous_manifest(self, job: JobState, signed_only: bool = False) -> Optional[Manifest]:
        """The newest readable manifest, whose file entries let unchanged files skip re-reading. For a user's job
        (whose directory the user can write) only one the agent signed is trusted."""
        for gen in reversed(self.store.generations(job.job_id, job.step)):
            try:
                return self.store.load_manifest(gen, require_signature=signed_only)
            except (DamagedCheckpointError, PermissionDenied):
                continue
        return None

    def _staging_dir(self, job: JobState) -> str:
        base = self.settings.staging_dir
        if base == "auto":
            need = capture.tree_rss_bytes(capture.ns_pids(job.init_pid)) + SHM_HEADROOM_BYTES
            base = staging_base(need, need)
        os.makedirs(base, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"dump.{os.getpid()}.{job.job_id}.{job.step}.", dir=base)

    def _store_images(self, chunks, pool, stage: str, previous: Optional[Manifest] = None,
                      ) -> Tuple[List[ImageEntry], WriteStats]:
        """Chunk the images into the store; a pages image as a page-granular delta against the previous
        generation's when pagedelta's compaction rule allows, else in full, with its page table either way."""
        images = []
        total = WriteStats()
        prev_images = {i.name: i for i in previous.images} if previous else {}
        for name in sorted(os.listdir(stage)):
            path = os.path.join(stage, name)
            if not os.path.isfile(path) or name.endswith(".log"):
                continue
            runs = pages_runs(stage, name) if name.startswith("pages-") else None
            if runs is not None and pagedelta.PAGE_HASH and name in prev_images:
                delta, st = pagedelta.store_delta(chunks, pool, path, runs, prev_images[name], f"image {name}",
                                                  chunks.claim_verification)
                total.add(st)
                if delta is not None:
                    images.append(delta)
                    continue
            cuts = pages_cut_points(stage, name, CHUNK_BYTES) if runs is not None else None
            refs, st, size = store_file(chunks, path, pool, cuts)
            total.add(st)
            entry = ImageEntry(name=name, size=size, chunks=refs)
            if runs is not None and pagedelta.PAGE_HASH and size == sum(n for _, n in runs) * pagedelta.PAGE:
                entry.pagetable, tst = pagedelta.store_table(chunks, *pagedelta.hash_file(path, runs), pool)
                total.add(tst)
            images.append(entry)
        return images, total

    # --- restore ------------------------------------------------------------------------------------------------
    def restore(
        self,
        job_id: str,
        step: str,
        pipe_fds: Dict[str, int],
        *,
        require_signature: bool = False,
        creds: Optional[Creds] = None,
        check_manifest: Optional[Callable[[Manifest], None]] = None,
        cgroup_pid: Optional[int] = None,
    ) -> RestoreResult:
        """Restore the newest intact generation; `pipe_fds` maps "stdout"/"stderr"/"status" to new pipe ends.

        The root wrapper restores its own job as its child (creds None). The agent restoring for an ordinary user
        passes the user's `creds` (files are put back with the user's file-system identity), requires the agent's
        signature, checks the manifest against the requester, and restores into the wrapper's cgroups.
        """
        t0 = time.monotonic()
        gens = self.store.generations(job_id, step)
        skipped: List[Tuple[int, str]] = []
        for gen in reversed(gens):
            try:
                manifest = self.store.load_manifest(gen, require_signature=require_signature)
                if check_manifest:
                    check_manifest(manifest)
                return self._restore_generation(gen, manifest, pipe_fds, skipped, creds, cgroup_pid, t0)
            except DamagedCheckpointError as e:
                log.warning("checkpoint %d of job %s step %s is damaged: %s", gen.number, job_id, step, e)
                skipped.append((gen.number, str(e)))
        if skipped:
            raise DamagedCheckpointError(
                f"no intact checkpoint of job {job_id} step {step}: " + "; ".join(f"#{n}: {w}" for n, w in skipped)
            )
        raise NotFoundError(f"no checkpoint of job {job_id} step {step}")

    def _restore_generation(self, gen: Generation, manifest: Manifest, pipe_fds, skipped, creds, cgroup_pid, t0,
                            ) -> RestoreResult:
        # each chunk is checked by the hash this node names chunks by first, by the other if that fails
        chunks = self.store.chunks_for(gen.job_id, digest=self.settings.chunk_digest)
        stage = tempfile.mkdtemp(prefix=f"{gen.job_id}.{gen.step}.restore.", dir=_restore_base(manifest))
        try:
            pagedelta.load_slices(chunks, manifest.images)  # a damaged slice table: the next older generation
            # served from the store, else rebuilt here
            streamed = streamdump.stream_images(self.settings, self.criu, stage,
                                                staged_in_ram=stage.startswith(SHM_STAGING + os.sep),
                                                purpose="restore")
            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                for img in [] if streamed else manifest.images:
                    name = os.path.basename(img.name)
                    restore_file(chunks, img.chunks, os.path.join(stage, name), pool, where=f"image {name}",
                                 slices=img.slices)
                # only below the job's working directory and extra paths; a signed checkpoint (whenever the store
                # holds a key, every one) may also put back files the tool had open elsewhere
                roots = [p for p in [manifest.cwd] + list(self.settings.extra_paths) if p]
                written, _ = capture.restore_files(chunks, pool, manifest.files, creds, roots=roots,
                                                   trusted=bool(self.store.signer.key))
            # `criu restore` checks this machine's CPU against the images first (IncompatibleCpuError): a refusal
            # leaves the files as this checkpoint had them, as the restore on a compatible node puts them back
            inherit = {}
            for key, ino in manifest.pipes.items():
                if key in pipe_fds:
                    inherit[pipe_fds[key]] = f"pipe:[{ino}]"
            # with dirty tracking the tree stays stopped until it is armed (_track_restored), so that its first
            # checkpoint sends only the pages written since the restore, as after a periodic checkpoint
            track = self._dirty_tracker() is not None
            args = dict(pidfile=os.path.join(stage, "restored.pid"), inherit_fds=inherit,
                        tcp_close=self.settings.tcp_close, sibling=creds is None, cgroup_pid=cgroup_pid,
                        leave_stopped=track)
            core_images: Dict[str, bytes] = {}  # which processes were stopped
            if streamed:
                pid = streamdump.restore_streamed(self.criu, chunks, manifest.images, stage, core_images=core_images,
                                                  **args)
            else:
                pid = self.criu.restore(stage, **args)
                core_images = _core_images_in(stage)
            # the namespace's init stopped too: the whole job was stopped from outside when it was checkpointed
            # (Slurm's suspend stops every process of a job; from inside, nothing can stop init), and its requeued
            # run is not suspended: every process runs. Else those the job stopped itself stay stopped.
            stopped_vpids = stopped_tasks(core_images)
            suspended = NS_INIT_PID in stopped_vpids
            if suspended:
                log.info("job %s step %s was stopped from outside when checkpoint %d was taken; its restored "
                         "processes run", gen.job_id, gen.step, gen.number)
            if track:
                self._track_restored(gen, manifest, pid, stage, [] if suspended else stopped_vpids)
            elif suspended:  # CRIU restored them stopped
                _resume(capture.ns_pids(pid))
        finally:
            # also after a failed restore or a CPU refusal: the images are in the store and may fill RAM in
            # /dev/shm; CRIU's log is kept elsewhere, named in the error (adapters/criu.py)
            shutil.rmtree(stage, ignore_errors=True)
        return RestoreResult(
            pid=pid, generation=gen.number, created=manifest.created, skipped=skipped,
            seconds=time.monotonic() - t0, files_written=written,
        )

    def _track_restored(self, gen: Generation, manifest: Manifest, pid: int, stage: str,
                        stopped_vpids: Sequence[int] = ()) -> None:
        """A tree restored with --leave-stopped: write-protect its pages, then let it run (but the processes its
        images record as stopped, `stopped_vpids`). Its memory then equals the images of `gen` except where it
        writes (the signal frames the kernel may have written before the stop are left reading as written:
        uffd.SIGNAL_FRAMES_SPAN), so its next dump may be written-only against `gen` (_written_only). Whatever
        fails here, the tree runs, and its next dump reads every page."""
        pids: List[int] = []
        held: Optional[Set[int]] = None
        guard: Optional[DumpGuard] = None
        try:
            guard = DumpGuard(pid, stage)  # should this process die before the SIGCONT below, the guard sends it
            pids = capture.ns_pids(pid)
            held = _held(stopped_vpids, pids)
            guard.hold(held)
            from ckpt_agent.adapters import uffd  # noqa: PLC0415 - _dirty_tracker() imported it already

            t0 = time.monotonic()
            if not uffd.wait_stopped(pids, uffd.STOP_WAIT_SECONDS):
                log.warning("restored job %s step %s: its processes did not stop within %.0f s; dirty tracking "
                            "starts at its next checkpoint", gen.job_id, gen.step, uffd.STOP_WAIT_SECONDS)
            elif self._arm(pids, restored=True):
                self._armed[(gen.job_id, gen.step)] = (gen.number, manifest.created, pid)
                log.debug("restored job %s step %s: dirty tracking armed in %.3f s", gen.job_id, gen.step,
                          time.monotonic() - t0)
        except (CkptError, OSError) as e:
            log.warning("restored job %s step %s: dirty tracking not armed: %s", gen.job_id, gen.step, e)
        finally:
            pids = pids or capture.ns_pids(pid)
            _resume(pids, held if held is not None else _held(stopped_vpids, pids))
            if guard is not None:
                guard.close()


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def staging_base(need_bytes: int, memory_bytes: int) -> str:
    """Where images are staged: tmpfs (SHM_STAGING) when /dev/shm has `need_bytes` free and `memory_bytes` of RAM
    are available, else local disk (DISK_STAGING)."""
    try:
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > need_bytes and _mem_available() > memory_bytes:
            return SHM_STAGING
    except OSError:
        pass
    return DISK_STAGING


def _restore_base(manifest: Manifest) -> str:
    """Rebuild images in tmpfs when memory allows (CRIU reads them once, fast), else on local disk."""
    need = manifest.image_bytes() + SHM_HEADROOM_BYTES
    base = staging_base(need, 2 * need)
    os.makedirs(base, mode=0o700, exist_ok=True)
    return base
