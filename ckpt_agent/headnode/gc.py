"""`ckpt gc`: keep the checkpoint store small without ever losing a live job's checkpoint.

Contract (docs/gc-and-report.md has the admin's version):
  1. take the gc lock (one run at a time); open the store root once and reach everything below it through directory
     file descriptors opened with O_NOFOLLOW, so a planted or swapped symbolic link is never followed and nothing
     outside the store (or on another file system mounted inside it) is touched;
  2. ask Slurm for the state of every job directory's job in one call; if Slurm cannot be asked, remove nothing
     (SlurmError, exit 76);
  3. decide per job (`decide`, pure): whole job directories of finished jobs after the grace period and of jobs
     Slurm does not know after max_age; superseded generations (beyond `keep`), generations of finished steps and
     abandoned partial generations of the others. Never a live job's newest committed generation;
  4. act per job under its lock taken exclusively without waiting (a checkpoint being written holds it shared: the
     job is skipped), then reclaim chunks that no kept manifest references (CheckpointStore.sweep_chunks);
  5. if the file system is fuller than the high watermark, remove further eligible checkpoints oldest first until
     under the low watermark, and say so when only live jobs' newest checkpoints are left.

Acting is done by an actuator: `RemoveActuator` removes, `DryRunActuator` walks the same trees and only counts, so
`--dry-run` prints exactly what a real run would do. Before a job directory goes, its events.jsonl is kept in
<store>/.history/<job>.jsonl for `ckpt report`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from ckpt_agent.adapters.slurm import FINAL_STATES, UNKNOWN
from ckpt_agent.errors import (
    CkptError,
    PermissionDenied,
    SlurmError,
    StoreError,
)
from ckpt_agent.node import fields as F
from ckpt_agent.store import event_names as ev
from ckpt_agent.store import layout
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.store.layout import EVENTS, HISTORY_DIR, MANIFEST, RESULT
from ckpt_agent.util.safeio import open_dir_nofollow, write_atomic
from ckpt_agent.util.units import human_bytes, iso_seconds

if TYPE_CHECKING:  # the node config module is not needed at run time here
    from ckpt_agent.node.config import AgentConfig

log = logging.getLogger(__name__)
events_log = logging.getLogger("ckpt.events")

HISTORY_MAX_BYTES = 16 << 20  # a job's events are a few KiB; a user-grown events file is cut here, not copied whole
MAX_DEPTH = 32  # deeper trees are not ours (the store layout is 4 levels deep); they are left alone, not recursed



# --- what gc sees and decides ---------------------------------------------------------------------------------
@dataclass
class StepView:
    name: str
    generations: List[Tuple[int, float]] = field(default_factory=list)  # (number, mtime), oldest first
    partials: List[Tuple[str, float]] = field(default_factory=list)  # (directory name, mtime)
    finished: bool = False  # result.json exists


@dataclass
class JobView:
    job_id: str
    state: str
    activity: float  # newest mtime of events, results, generations and partials (epoch seconds)
    steps: List[StepView] = field(default_factory=list)
    end_time: Optional[float] = None  # from Slurm, for finished jobs
    partition: str = ""  # the job's Slurm partition (= ParallelCluster queue), when the policy keeps per queue


@dataclass
class Policy:
    """What gc keeps: agent.yaml's `gc` section and `checkpoint.keep` (`from_config`); the defaults are theirs
    (node/fields.py), so a policy built in a test means what the same numbers mean in a configuration."""

    grace: float = F.GRACE.default
    max_age: float = F.MAX_AGE.default
    history_max_age: float = F.HISTORY_MAX_AGE.default
    keep: int = F.KEEP.default
    high_watermark: float = F.HIGH_WATERMARK.default
    low_watermark: float = F.LOW_WATERMARK.default
    keep_by_queue: Dict[str, int] = field(default_factory=dict)  # {partition: keep}; others use `keep`

    @classmethod
    def from_config(cls, cfg: AgentConfig, grace: Optional[float] = None) -> Policy:
        """The policy of a loaded agent.yaml; `grace` (the --grace flag) overrides gc.grace."""
        g = cfg.gc
        return cls(grace=g.grace if grace is None else grace, max_age=g.max_age, history_max_age=g.history_max_age,
                   keep=cfg.checkpoint.keep,
                   high_watermark=g.high_watermark, low_watermark=g.low_watermark, keep_by_queue=dict(g.queue_keep))

    def keep_for(self, partition: str) -> int:
        return self.keep_by_queue.get(partition, self.keep)


@dataclass
class Action:
    job_id: str
    kind: str  # job | generation | partial
    reason: str
    step: str = ""
    name: str = ""  # generation or partial directory name
    age: float = 0.0  # mtime used for "oldest first" under pressure

    @property
    def target(self) -> str:
        return "/".join(p for p in (self.job_id, self.step, self.name) if p)

    @property
    def generation(self) -> Optional[Tuple[str, int]]:
        number = layout.generation_number(self.name) if self.kind == "generation" else None
        return (self.step, number) if number is not None else None


@dataclass
class JobDecision:
    actions: List[Action]  # what the policy removes now
    pressure: List[Action]  # what may also go when the file system is above the high watermark
    note: str  # why the rest is kept (one phrase)


def classify(state: str) -> str:
    if state == UNKNOWN:
        return "unknown"
    return "final" if state in FINAL_STATES else "live"


def _ago(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} d"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 60:.0f} min"


def decide(job: JobView, now: float, policy: Policy) -> JobDecision:
    """The cleanup policy for one job; pure, so it is tested as a table."""
    kind = classify(job.state)
    whole = Action(job.job_id, "job", "", age=job.activity)
    if kind == "final":
        since = max(job.end_time or 0.0, job.activity)
        idle = now - since
        if idle >= policy.grace:
            whole.reason = f"job {job.state}, ended {_ago(idle)} ago (grace {_ago(policy.grace)})"
            return JobDecision([whole], [], "")
        whole.reason = f"job {job.state}, within the grace period (file system above high watermark)"
        return JobDecision(_prune(job, now, policy), [whole], f"{job.state}, within grace")
    if kind == "unknown":
        idle = now - job.activity
        if idle >= policy.max_age:
            whole.reason = f"job unknown to Slurm, inactive for {_ago(idle)} (max_age {_ago(policy.max_age)})"
            return JobDecision([whole], [], "")
        whole.reason = "job unknown to Slurm, before max_age (file system above high watermark)"
        return JobDecision(_prune(job, now, policy), [whole], "unknown to Slurm, before max_age")
    actions = _prune(job, now, policy)
    pressure = []
    for step in job.steps:  # under pressure the fallback generations go; the newest committed one never does
        removed = {a.name for a in actions if a.step == step.name}
        left = [(n, t) for n, t in step.generations if f"gen-{n:06d}" not in removed]
        for number, mtime in left[:-1]:
            pressure.append(Action(job.job_id, "generation", f"fallback checkpoint of {job.state} job (file system "
                                   "above high watermark)", step.name, f"gen-{number:06d}", mtime))
    return JobDecision(actions, pressure, f"{job.state}")


def _prune(job: JobView, now: float, policy: Policy) -> List[Action]:
    out = []
    for step in job.steps:
        if step.finished:  # a finished step needs no checkpoint; its result.json stays until the job goes
            doomed = step.generations
            why = "step finished (result.json kept)"
        else:
            keep = policy.keep_for(job.partition)
            doomed = step.generations[: max(0, len(step.generations) - keep)]
            queue = f", queue {job.partition}" if job.partition in policy.keep_by_queue else ""
            why = f"superseded (keep {keep}{queue})"
        for number, mtime in doomed:
            out.append(Action(job.job_id, "generation", why, step.name, f"gen-{number:06d}", mtime))
        for name, mtime in step.partials:  # reached only with the job lock free: nobody is writing them
            if step.finished:  # its wrapper has ended: a partial can only be a dead checkpointer's debris
                out.append(Action(job.job_id, "partial", "partial checkpoint of a finished step", step.name, name,
                                  mtime))
            elif now - mtime >= policy.grace:
                out.append(Action(job.job_id, "partial", f"abandoned partial checkpoint, {_ago(now - mtime)} old",
                                  step.name, name, mtime))
    return out


# --- actuators ---------------------------------------------------------------------------------------------------
class Actuator:
    """Walks a tree through directory descriptors, never following a link, and hands each entry to `_unlink` /
    `_rmdir`; subclasses decide whether those remove. Returns bytes (st_size of regular files) of what went."""

    dry_run = False
    verb = "removed"

    def __init__(self, hook: Optional[Callable[[str, str], None]] = None):
        self.hook = hook or (lambda stage, name: None)  # tests swap directories for links at these points

    def remove_tree(self, parent_fd: int, name: str, dev: int, depth: int = 0) -> int:
        self.hook("before-open", name)
        fd = open_dir_nofollow(name, parent_fd)
        if fd is None:  # a file or a symbolic link (possibly swapped in): unlinking it never follows it
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise StoreError(f"{name}: cannot open directory")
            self._unlink(parent_fd, name)
            return st.st_size if stat.S_ISREG(st.st_mode) else 0
        total = 0
        try:
            st = os.fstat(fd)
            if st.st_dev != dev:
                raise StoreError(f"{name}: on another file system (a mount point?); left alone")
            if depth > MAX_DEPTH:
                raise StoreError(f"{name}: deeper than {MAX_DEPTH} levels; left alone")
            self.hook("opened", name)
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for child in names:
                cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(cst.st_mode):
                    total += self.remove_tree(fd, child, dev, depth + 1)
                else:
                    self._unlink(fd, child)
                    total += cst.st_size if stat.S_ISREG(cst.st_mode) else 0
        finally:
            os.close(fd)
        now = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)  # re-verify: still the directory we emptied
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise StoreError(f"{name}: replaced while being removed; left alone")
        self._rmdir(parent_fd, name)
        return total

    def unlink_history(self, dir_fd: int, name: str) -> None:
        self._unlink(dir_fd, name)

    def unlink_chunk(self, dir_fd: int, name: str, size: int) -> None:
        self._unlink(dir_fd, name)

    def archive_events(self, root_fd: int, job_fd: int, job_id: str) -> None:
        """Keep the job's events for `ckpt report` in <store>/.history/<job>.jsonl."""

    def _unlink(self, dir_fd: int, name: str) -> None:
        raise NotImplementedError

    def _rmdir(self, dir_fd: int, name: str) -> None:
        raise NotImplementedError


class RemoveActuator(Actuator):
    def _unlink(self, dir_fd: int, name: str) -> None:
        os.unlink(name, dir_fd=dir_fd)

    def _rmdir(self, dir_fd: int, name: str) -> None:
        os.rmdir(name, dir_fd=dir_fd)

    def archive_events(self, root_fd: int, job_fd: int, job_id: str) -> None:
        try:
            src = os.open(EVENTS, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=job_fd)
        except OSError:
            return
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                return
            data = os.read(src, HISTORY_MAX_BYTES)
        finally:
            os.close(src)
        try:
            os.mkdir(HISTORY_DIR, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        hist = open_dir_nofollow(HISTORY_DIR, root_fd)
        if hist is None or os.fstat(hist).st_uid != os.geteuid():
            if hist is not None:
                os.close(hist)
            log.warning("%s is not a directory of ours (planted?); events of job %s not kept", HISTORY_DIR, job_id)
            return
        try:
            write_atomic(f"{job_id}.jsonl", data, durable=False, dir_fd=hist)
        finally:
            os.close(hist)


class DryRunActuator(Actuator):
    """Walks and counts exactly like RemoveActuator; removes nothing."""

    dry_run = True
    verb = "would remove"

    def _unlink(self, dir_fd: int, name: str) -> None:
        pass

    def _rmdir(self, dir_fd: int, name: str) -> None:
        pass


# --- the run -------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    removed: List[Tuple[Action, int]] = field(default_factory=list)
    chunks: List[Tuple[str, int, int]] = field(default_factory=list)  # (job, files, bytes)
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (what, why)
    errors: List[str] = field(default_factory=list)
    kept: Dict[str, str] = field(default_factory=dict)  # job -> why its checkpoints stay
    pressure: str = ""

    @property
    def freed(self) -> int:
        return sum(b for _, b in self.removed) + sum(b for _, _, b in self.chunks)


def disk_usage(path: str) -> Tuple[int, int]:
    """(total, used) bytes of the file system holding path."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize


class GarbageCollector:
    def __init__(self, store: CheckpointStore, slurm, policy: Policy, actuator: Actuator,
                 usage: Callable[[str], Tuple[int, int]] = disk_usage, now: Callable[[], float] = time.time,
                 say: Callable[[str], None] = print):
        self.store = store
        self.slurm = slurm
        self.policy = policy
        self.act = actuator
        self.usage = usage
        self.now = now
        self.say = say
        self.out = Outcome()

    def run(self) -> Outcome:
        root_fd = os.open(self.store.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.root_fd, self.dev = root_fd, os.fstat(root_fd).st_dev
            self.usage_before = self.usage(self.store.root)  # before anything goes: the same in a dry run
            views = self._scan()
            now = self.now()
            decisions = {v.job_id: decide(v, now, self.policy) for v in views}
            pressure: List[Action] = []
            for view in views:
                d = decisions[view.job_id]
                if d.note:
                    self.out.kept[view.job_id] = d.note
                if self._apply(view.job_id, d.actions) is None:  # also with no action: orphaned chunks go
                    continue  # busy: nothing of it under pressure either
                pressure.extend(d.pressure)
            self._relieve(pressure)
            self._prune_history(now)
        finally:
            os.close(root_fd)
        return self.out

    def _prune_history(self, now: float) -> None:
        """Remove the events of removed jobs (<store>/.history/<job>.jsonl) older than policy.history_max_age. Only
        regular files of ours, never through a link; a directory planted there is left alone."""
        hist = open_dir_nofollow(HISTORY_DIR, self.root_fd)
        if hist is None:
            return
        try:
            if os.fstat(hist).st_uid != os.geteuid():
                return
            for name in sorted(os.listdir(hist)):
                try:
                    st = os.stat(name, dir_fd=hist, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not name.endswith(".jsonl") or not stat.S_ISREG(st.st_mode):
                    continue
                age = now - st.st_mtime
                if age <= self.policy.history_max_age:
                    continue
                self.act.unlink_history(hist, name)
                self.say(f"{self.act.verb} {HISTORY_DIR}/{name}: events of a removed job, "
                         f"{age / 86400:.0f} days old (gc.history_max_age)")
        except OSError as e:
            self.out.errors.append(f"{HISTORY_DIR}: {e.strerror or e}")
        finally:
            os.close(hist)

    # 1. what is in the store, and what Slurm says about it
    def _scan(self) -> List[JobView]:
        views: List[JobView] = []
        with os.scandir(self.root_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            if not layout.is_job_name(e.name) or e.is_symlink() or not e.is_dir(follow_symlinks=False):
                self.out.skipped.append((e.name, "not a job directory (a symbolic link or a file?); left alone"))
                continue
            fd = open_dir_nofollow(e.name, self.root_fd)
            if fd is None:
                continue
            try:
                if os.fstat(fd).st_dev != self.dev:
                    self.out.skipped.append((e.name, "on another file system; left alone"))
                    continue
                if not _looks_like_job(e.name, fd):
                    self.out.skipped.append((e.name, "not a job directory (no lock, events or chunks); left alone"))
                    continue
                views.append(_view(e.name, fd))
            finally:
                os.close(fd)
        states = self._states([v.job_id for v in views])
        partitions = self._partitions([v.job_id for v in views]) if self.policy.keep_by_queue else {}
        now = self.now()
        for v in views:
            v.state = states.get(v.job_id, UNKNOWN)
            v.partition = partitions.get(v.job_id, "")
            if classify(v.state) == "final" and now - v.activity >= self.policy.grace:
                v.end_time = self._end_time(v.job_id)
        return views

    def _states(self, job_ids: Sequence[str]) -> Dict[str, str]:
        from ckpt_agent.adapters.slurm import check_job_id

        asked = []
        for j in job_ids:
            try:
                asked.append(check_job_id(j))
            except SlurmError:
                pass  # not a Slurm job id (a manual `ckpt run --job-id`): Slurm cannot know it
        try:
            return dict(self.slurm.job_states(asked)) if asked else {}
        except SlurmError as e:
            raise SlurmError(f"cannot ask Slurm for job states, nothing removed: {e}") from e

    def _partitions(self, job_ids: Sequence[str]) -> Dict[str, str]:
        """{job id: partition} for the per-queue `keep`; a job Slurm has forgotten keeps the default."""
        from ckpt_agent.adapters.slurm import check_job_id

        asked = []
        for j in job_ids:
            try:
                asked.append(check_job_id(j))
            except SlurmError:
                pass
        try:
            return dict(self.slurm.job_partitions(asked)) if asked else {}
        except SlurmError as e:
            raise SlurmError(f"cannot ask Slurm for job partitions, nothing removed: {e}") from e

    def _end_time(self, job_id: str) -> Optional[float]:
        try:
            end = self.slurm.job_info(job_id).end_time
        except CkptError:
            return None  # slurmctld forgot the job (only sacct knows it): the directory's activity counts
        return end.timestamp() if isinstance(end, dt.datetime) else None

    # 2. acting on one job, under its lock
    def _apply(self, job_id: str, actions: List[Action]) -> Optional[int]:
        job_fd = open_dir_nofollow(job_id, self.root_fd)
        if job_fd is None:
            self.out.skipped.append((job_id, "vanished or replaced by a link; left alone"))
            return 0
        try:
            with self.store.job_lock(job_id, exclusive=True, blocking=False, dir_fd=job_fd) as locked:
                if not locked:
                    self.out.skipped.append((job_id, "a checkpoint is being written; left for the next run"))
                    self.out.kept[job_id] = "busy"
                    return None
                return self._apply_locked(job_id, job_fd, actions)
        except OSError as e:
            self.out.errors.append(f"{job_id}: {e.strerror or e}")
            return 0
        finally:
            os.close(job_fd)

    def _apply_locked(self, job_id: str, job_fd: int, actions: List[Action]) -> int:
        freed = 0
        if any(a.kind == "job" for a in actions):
            self.act.archive_events(self.root_fd, job_fd, job_id)
            return self._remove(actions[0], self.root_fd)
        for a in actions:
            self.act.hook("before-open", a.step)
            step_fd = open_dir_nofollow(a.step, job_fd)
            if step_fd is None:
                self.out.skipped.append((a.target, "step directory vanished or replaced by a link; left alone"))
                continue
            try:
                self.act.hook("opened", a.step)
                freed += self._remove(a, step_fd)
            finally:
                os.close(step_fd)
        return freed + self._sweep(job_id, job_fd)

    def _remove(self, a: Action, parent_fd: int) -> int:
        name = a.job_id if a.kind == "job" else a.name
        try:
            size = self.act.remove_tree(parent_fd, name, self.dev)
        except (OSError, StoreError) as e:
            self.out.errors.append(f"{a.target}: {getattr(e, 'strerror', None) or e}")
            return 0
        self.out.removed.append((a, size))
        self.say(f"{self.act.verb} {a.target}: {a.reason}; {human_bytes(size)}")
        events_log.info("%s", json.dumps({"event": ev.GC_REMOVED, "time": iso_seconds(self.now()), "job_id": a.job_id,
                                          "step": a.step, "target": a.target, "kind": a.kind, "reason": a.reason,
                                          "bytes": size, "dry_run": self.act.dry_run}, sort_keys=True))
        return size

    def _sweep(self, job_id: str, job_fd: int) -> int:
        gone = [a.generation for a, _ in self.out.removed if a.job_id == job_id and a.generation]
        try:
            referenced = self.store.referenced_digests(job_id, skip=gone, strict=True)
        except (StoreError, PermissionDenied) as e:
            self.out.skipped.append((f"{job_id}/chunks", f"a kept manifest is unreadable, chunks kept ({e})"))
            return 0
        # the manifests were read by path: make sure that path still is the directory we hold (not a swapped link)
        here = os.stat(job_id, dir_fd=self.root_fd, follow_symlinks=False)
        held = os.fstat(job_fd)
        if (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
            self.out.skipped.append((f"{job_id}/chunks", "job directory replaced while being read; chunks kept"))
            return 0
        files, size = self.store.sweep_chunks(job_id, referenced=referenced, locked=True,
                                              unlink=self.act.unlink_chunk, job_fd=job_fd)
        if files:
            self.out.chunks.append((job_id, files, size))
            self.say(f"{self.act.verb} {files} unreferenced chunk(s) of job {job_id}; {human_bytes(size)}")
        return size

    # 3. the watermarks
    def _relieve(self, candidates: List[Action]) -> None:
        total, used = self.usage_before
        if not total:
            return
        used -= self.out.freed  # counted, not measured again: a dry run frees nothing but must decide the same
        p = self.policy
        if 100.0 * used / total <= p.high_watermark:
            return
        self.say(f"store file system {100.0 * used / total:.1f}% full (high watermark {p.high_watermark:g}%): "
                 f"removing eligible checkpoints oldest first until under {p.low_watermark:g}%")
        for a in sorted(candidates, key=lambda c: c.age):
            if 100.0 * used / total < p.low_watermark:
                break
            freed = self._apply(a.job_id, [a])
            used -= freed or 0
            if freed is not None and a.kind == "job":
                self.out.kept.pop(a.job_id, None)
        pct = 100.0 * used / total
        if pct >= p.low_watermark:
            self.out.pressure = (f"store file system still {pct:.1f}% full (low watermark {p.low_watermark:g}%): "
                                 "only live jobs' newest checkpoints (and busy jobs) are left; nothing more can go")
            self.say(self.out.pressure)
            log.warning("%s", self.out.pressure)


def _view(job_id: str, job_fd: int) -> JobView:
    """The job directory as gc needs it, read through descriptors (links are neither followed nor counted)."""
    times = []
    view = JobView(job_id, UNKNOWN, 0.0)
    for name, st in _entries(job_fd):
        if name == EVENTS and stat.S_ISREG(st.st_mode):
            times.append(st.st_mtime)
        elif stat.S_ISDIR(st.st_mode) and layout.is_step_name(name):
            step_fd = open_dir_nofollow(name, job_fd)
            if step_fd is None:
                continue
            try:
                step = StepView(name)
                for child, cst in _entries(step_fd):
                    if child == RESULT and stat.S_ISREG(cst.st_mode):
                        step.finished = True
                        times.append(cst.st_mtime)
                    elif not stat.S_ISDIR(cst.st_mode):
                        continue
                    elif layout.generation_number(child) is not None and _has_manifest(step_fd, child):
                        step.generations.append((layout.generation_number(child), cst.st_mtime))
                        times.append(cst.st_mtime)
                    elif layout.partial_number(child) is not None:
                        step.partials.append((child, cst.st_mtime))
                        times.append(cst.st_mtime)
                step.generations.sort()
                view.steps.append(step)
            finally:
                os.close(step_fd)
    view.activity = max(times) if times else os.fstat(job_fd).st_mtime
    return view


def _looks_like_job(name: str, fd: int) -> bool:
    """A Slurm job id, or a directory `ckpt run` made (a manual --job-id): never lost+found or an admin's folder."""
    from ckpt_agent.adapters.slurm import check_job_id

    if name == "lost+found":
        return False
    try:
        check_job_id(name)
        return True
    except SlurmError:
        pass
    return any(n in (layout.LOCK, EVENTS, layout.CHUNKS_DIR) for n, _ in _entries(fd))


def _entries(dir_fd: int) -> List[Tuple[str, os.stat_result]]:
    out = []
    with os.scandir(dir_fd) as it:
        names = sorted(e.name for e in it)
    for name in names:
        try:
            out.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)))
        except OSError:
            continue
    return out


def _has_manifest(step_fd: int, gen: str) -> bool:
    fd = open_dir_nofollow(gen, step_fd)
    if fd is None:
        return False
    try:
        return stat.S_ISREG(os.stat(MANIFEST, dir_fd=fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
    finally:
        os.close(fd)


class GcLock:
    """One `ckpt gc` at a time: flock on a file in the root-owned runtime directory (not in the store, where any
    user could create the file and hold the lock forever)."""

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            return False
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def summary(out: Outcome, dry_run: bool) -> str:
    verb = "would free" if dry_run else "freed"
    jobs = sum(1 for a, _ in out.removed if a.kind == "job")
    gens = sum(1 for a, _ in out.removed if a.kind != "job")
    return (f"gc: {jobs} job director{'y' if jobs == 1 else 'ies'} and {gens} generation(s)/partial(s) "
            f"{'to remove' if dry_run else 'removed'}, {verb} {human_bytes(out.freed)}; {len(out.kept)} job(s) kept, "
            f"{len(out.skipped)} skipped, {len(out.errors)} error(s)")
