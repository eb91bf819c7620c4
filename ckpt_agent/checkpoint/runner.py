"""`ckpt run`: launch a tool, or resume it from its last checkpoint, and checkpoint it while it runs.

The wrapper stays outside the checkpointed tree: the tool runs under nsinit in its own PID namespace and writes
to pipes the wrapper relays to its own stdout/stderr (Slurm's output file). A restore hands CRIU new pipes
(`--inherit-fd`), and CRIU does not refill inherited pipes with the data it saw in them at dump time (criu/pipes.c,
open_pipe), so the wrapper simply relays everything the tool wrote up to the checkpoint, also after a final one:
after a final checkpoint and resume, the output continues with no line lost and none repeated.

Nesting: the wrapper puts NESTED_ENV=<job id>/<step> into the tool's environment. A `ckpt run` that finds it naming
its own job is inside a checkpointed tree already (a script that calls `ckpt run` itself, run by transparent mode's
`ckpt run --name batch`): the inner one runs its tool plainly (exec), and the outer one checkpoints the whole tree.
Another job's value (a job submitted from inside a checkpointed one inherits the environment) does not count.

The wrapper registers in the runtime directory (a JSON file and a control socket per job step), which is how
`ckpt checkpoint` and the node agent reach it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ckpt_agent.adapters import control
from ckpt_agent.checkpoint import planner
from ckpt_agent.checkpoint.engine import JobState
from ckpt_agent.checkpoint.progress import RestoreProgress, newest_image_bytes
from ckpt_agent.checkpoint.registry import (  # noqa: F401 - the registration's owner; re-exported for callers
    REGISTRATION_MAX_BYTES,
    find_registration,
    list_registrations,
    process_start_time,
    process_state,
    registration_alive,
    registration_dir,
    registration_paths,
    remove_stale_registration,
)
from ckpt_agent.errors import (
    EXIT_FINAL,
    AlreadyRunning,
    CkptError,
    IncompatibleCpuError,
    NotFoundError,
    StoreError,
)
from ckpt_agent.node.requeue import read_marker
from ckpt_agent.store import event_names as ev
from ckpt_agent.store.events import emit, load_instance, node_name
from ckpt_agent.store.generations import (
    CheckpointStore,
    iso,
    utcnow,
)
from ckpt_agent.store.layout import RUN_LOCK
from ckpt_agent.util.safeio import write_atomic

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT)
RELAY_BUFFER_BYTES = 1 << 16
# a failed periodic checkpoint (a full store...) is retried after this, doubling up to the interval
RETRY_FIRST_SECONDS = 15.0
NESTED_ENV = "CKPT_PROTECTED_BY"  # set in the tool's environment: "<job id>/<step>" of the enclosing `ckpt run`
MODES = ("explicit", "transparent")  # `ckpt run -- tool` in a job script | the job_submit plugin's whole-script run


def enclosing_step(job_id: str, environ=None) -> Optional[str]:
    """The step of an enclosing `ckpt run` of the same job, from NESTED_ENV; None when there is none."""
    value = (os.environ if environ is None else environ).get(NESTED_ENV, "")
    job, _, step = value.rpartition("/")
    return step if job == job_id and step else None
# After a final checkpoint the node agent asked for, the wrapper waits for the agent's requeue before it exits 75
# (requeue.py). The agent's requeue is one scontrol call (20 s timeout in slurm.py); 60 s covers a slow controller,
# and the instance is gone 120 s after the notice anyway.
REQUEUE_WAIT_SECONDS = 60
REQUEUE_POLL_SECONDS = 0.1
# The store's cleanup after a final checkpoint (prune, chunk sweep) runs after the reply (engine.py); the wrapper
# gives it this long before it exits anyway: what is left, the next checkpoint or `ckpt gc` removes.
CLEANUP_WAIT_SECONDS = 30


class StepLock:
    """One live wrapper per job step: an exclusive flock on <step>/run.lock in the store, held for the wrapper's life.

    The store is the one place every node of the cluster shares, so a second wrapper is refused wherever it runs
    (FSx for Lustre and NFSv4 grant flock cluster-wide). Stale-lock rule: the kernel (or the file system's lock
    manager, which evicts a node that stops answering) releases the lock when its holder dies, so a crashed wrapper
    or a lost node never blocks the step for good; the holder's pid, node and start time are written into the file
    only to name it in the refusal.
    """

    def __init__(self, store: CheckpointStore, job_id: str, step: str):
        self.path = os.path.join(store.step_dir(job_id, step), RUN_LOCK)
        self.job_id, self.step = job_id, step
        self.fd: Optional[int] = None

    def acquire(self, node: str, cwd: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_small(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"cannot lock {self.path}: {e.strerror}") from e
            who = ""
            try:
                h = json.loads(holder)
                who = f" (pid {h['pid']} on node {h['node']}, started {h['started']} in {h['cwd']})"
            except (ValueError, KeyError, TypeError):
                pass
            raise AlreadyRunning(
                f"job {self.job_id} step {self.step} is already running under another ckpt run{who}; "
                f"refusing to start a second copy (lock {self.path})"
            ) from None
        self.fd = fd
        info = {"pid": os.getpid(), "node": node, "started": iso(utcnow()), "cwd": cwd}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:  # only informative: the lock itself is held
            log.warning("cannot record the lock holder in %s: %s", self.path, e.strerror)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the flock goes with the last descriptor
            self.fd = None


def _read_small(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return ""


class Relay:
    """Copies a pipe to one of our descriptors in a thread until the pipe's last writer is gone."""

    def __init__(self, src: int, dst: int, name: str):
        self.src, self.dst = src, dst
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"relay-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        try:
            while True:
                data = os.read(self.src, RELAY_BUFFER_BYTES)
                if not data:
                    return
                self._write_all(data)
        finally:
            self.done.set()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.dst, view)
            except BrokenPipeError:
                return
            except InterruptedError:
                continue
            view = view[n:]


@dataclass
class RunOptions:
    job_id: str
    step: str
    argv: List[str]
    interval: float
    runtime_dir: str
    cwd: str = field(default_factory=os.getcwd)
    mode: str = "explicit"  # one of MODES
    agent_socket: str = ""  # the node agent, which requeues a job whose restore this CPU refused
    # seconds a final checkpoint may take (planner.budget_seconds): periodic checkpoints come often enough for it
    budget: float = field(default_factory=lambda: planner.budget_seconds({}))
    # on a notice, a periodic checkpoint younger than this stands in for a final one that cannot fit (None: one
    # periodic interval, the work a job loses at worst anyway)
    recent: Optional[float] = None


class Runner:
    def __init__(self, opts: RunOptions, store: CheckpointStore, backend):
        self.opts = opts
        self.store = store
        self.backend = backend  # backends.LocalBackend (root) or backends.AgentBackend (through the node agent)
        self.node = node_name()
        self.instance = load_instance(opts.runtime_dir)
        self.job: Optional[JobState] = None
        self._ckpt_lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped_by_final = False
        self._await_requeue = False  # the final checkpoint came from the agent, which requeues the job next
        self._step_lock: Optional[StepLock] = None
        self._relays: List[Relay] = []
        self._server: Optional[control.ControlServer] = None
        self._reg_path = ""
        self.last_checkpoint: Optional[int] = None
        self.interval = opts.interval  # the periodic interval, shortened by the deadline plan when needed
        self.clock = time.monotonic
        self._newest_periodic: Optional[Dict[str, Any]] = None  # {"at": clock(), "generation", "frozen_seconds"}
        self._final_rates: Optional[planner.IntervalPlan] = None  # the newest deadline plan's rates

    # --- main ---------------------------------------------------------------------------------------------------
    def run(self) -> int:
        """1. take the step's run lock (a second live wrapper is refused here, before it touches anything);
        2. a finished step returns its recorded status; 3. sweep partial checkpoints dead wrappers left;
        4. launch or restore, relay, register, checkpoint periodically until the tree ends."""
        o = self.opts
        self.store.ensure_job(o.job_id, o.step, os.getuid(), os.getgid())
        self._step_lock = StepLock(self.store, o.job_id, o.step)
        self._step_lock.acquire(self.node, o.cwd)
        try:
            return self._run_locked()
        finally:
            self._step_lock.release()

    def _run_locked(self) -> int:
        o = self.opts
        done = self.store.result(o.job_id, o.step)
        if done is not None:
            code = int(done["exit_status"])
            print(f"ckpt: job {o.job_id} step {o.step} already finished with status {code}; not running it again",
                  file=sys.stderr, flush=True)
            return code
        self._refuse_orphaned_tool()
        self._sweep_partials()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        pipes = {"stdout": out_w, "stderr": err_w, "status": st_w}
        try:
            init_pid = self._start(pipes)
        except IncompatibleCpuError as e:
            for fd in (out_r, out_w, err_r, err_w, st_r, st_w):
                os.close(fd)
            return self._requeue_to_compatible_cpu(e)
        for fd in (out_w, err_w, st_w):
            os.close(fd)
        self.job = JobState(
            job_id=o.job_id, step=o.step, init_pid=init_pid, cwd=o.cwd, argv=list(o.argv),
            pipe_inodes={"stdout": os.fstat(out_r).st_ino, "stderr": os.fstat(err_r).st_ino,
                         "status": os.fstat(st_r).st_ino},
            uid=os.getuid(), gid=os.getgid(), exclude=self._excluded_paths(), node=self.node, instance=self.instance,
        )
        self._relays = [Relay(out_r, 1, "stdout"), Relay(err_r, 2, "stderr")]
        for r in self._relays:
            r.start()
        self._install_signal_forwarding(init_pid)
        self._register()
        periodic = threading.Thread(target=self._periodic, name="periodic", daemon=True)
        periodic.start()
        try:
            code = self._wait(st_r, init_pid)
        finally:
            self._stop.set()
            self._unregister()
        return self._finish(code)

    def _start(self, pipes: Dict[str, int]) -> int:
        o = self.opts
        if self.store.generations(o.job_id, o.step):
            try:
                total = newest_image_bytes(self.store, o.job_id, o.step) if sys.stderr.isatty() else None
                with RestoreProgress(sys.stderr, o.job_id, o.step, total):
                    res = self.backend.restore(o.job_id, o.step, pipes)
            except CkptError as e:
                self._emit(ev.RESTORE_FAILED, error=str(e), restart_count=_restart_count())
                raise
            for number, why in res.skipped:
                print(f"ckpt: checkpoint {number} is damaged ({why}); using an older one", file=sys.stderr)
            restart = os.environ.get("SLURM_RESTART_COUNT", "0")
            what = (f"by transparent checkpointing (job {o.job_id}, step {o.step})" if o.mode == "transparent"
                    else f"job {o.job_id} step {o.step}")
            print(f"ckpt: resumed {what} from checkpoint {res.generation} taken {res.created} "
                  f"(restart count {restart}, {res.seconds:.1f} s)", file=sys.stderr, flush=True)
            self.last_checkpoint = res.generation
            self._emit(ev.RESTORED, generation=res.generation, checkpoint_time=res.created,
                       seconds=round(res.seconds, 3), files_written=res.files_written,
                       restart_count=int(restart or 0), fell_back_from=[number for number, _ in res.skipped])
            self._emit(ev.SEGMENT_STARTED, how="restored", generation=res.generation, mode=o.mode)
            return res.pid
        env = {**os.environ, NESTED_ENV: f"{o.job_id}/{o.step}"}
        pid = self.backend.launch(o.argv, o.cwd, env, pipes, o.job_id, o.step)
        if o.mode == "transparent":
            print(f"ckpt: protected by transparent checkpointing (job {o.job_id}, step {o.step})", file=sys.stderr,
                  flush=True)
        else:
            print(f"ckpt: started job {o.job_id} step {o.step}: no checkpoint yet", file=sys.stderr, flush=True)
        self._emit(ev.SEGMENT_STARTED, how="launched", argv=o.argv, cwd=o.cwd, mode=o.mode,
                   restart_count=_restart_count())
        return pid

    def _emit(self, event: str, **fields: Any) -> None:
        """One lifecycle event of this step (the job, node, instance and step are always the same)."""
        emit(self.store, self.opts.job_id, event, node=self.node, instance=self.instance, step=self.opts.step, **fields)

    def _refuse_orphaned_tool(self) -> None:
        """A wrapper killed on this node can leave its tool running (outside Slurm nothing ends it): restoring the
        step under it would put its files back in time, so the step is refused until that tool is stopped."""
        o = self.opts
        try:
            reg = find_registration(o.runtime_dir, o.job_id, o.step)
        except CkptError:
            return
        init_pid = reg.get("init_pid")
        if (reg.get("init_start") is not None and process_start_time(init_pid) == reg["init_start"]
                and process_state(init_pid) not in ("Z", "X", None)):  # a dead init not yet reaped is gone
            raise AlreadyRunning(
                f"job {o.job_id} step {o.step}: the tool of a ckpt run that ended (pid {reg.get('pid')}) still runs "
                f"as namespace init {init_pid}; stop it (kill -9 {init_pid}) before running the step again"
            )

    def _sweep_partials(self) -> None:
        """Partial checkpoints of this step can only be debris of a dead wrapper now that we hold its run lock;
        they go when nobody writes to the job (its lock is free). Ones we may not remove (an agent's, for a user's
        job) are left to `ckpt gc`."""
        o = self.opts
        with self.store.job_lock(o.job_id, exclusive=True, blocking=False) as got:
            if not got:
                return
            for partial in self.store.partials(o.job_id, o.step):
                self.store.abort(partial)
                if not os.path.exists(partial):
                    log.info("removed %s, left by a checkpoint that did not finish", partial)

    def _excluded_paths(self) -> set:
        """Never capture (and so never put back) our own output files, the runtime dir or the store."""
        out = {os.path.abspath(self.opts.runtime_dir)}
        for fd in (1, 2):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("/"):
                    out.add(target)
            except OSError:
                pass
        return out

    def _wait(self, st_r: int, init_pid: int) -> Optional[int]:
        """Block until the tree ends; return the tool's status, or None when it was killed without one."""
        data = b""
        while True:
            part = os.read(st_r, 64)
            if not part:
                break
            data += part
        os.close(st_r)
        try:
            _, wstatus = os.waitpid(init_pid, 0)  # reap: the init is our child (launched or restored as sibling)
            fallback = os.waitstatus_to_exitcode(wstatus)
            fallback = 128 - fallback if fallback < 0 else fallback
        except ChildProcessError:
            fallback = None
        text = data.decode(errors="replace").strip().splitlines()
        if text:
            try:
                return int(text[-1])
            except ValueError:
                pass
        return fallback

    def _finish(self, code: Optional[int]) -> int:
        o = self.opts
        with self._ckpt_lock:  # a final checkpoint in flight kills the tree before it records that it did
            stopped_by_final = self._stopped_by_final
        for r in self._relays:  # everything the tool wrote reaches the output before we exit
            r.done.wait(timeout=30)
        if stopped_by_final:
            self._emit(ev.SEGMENT_ENDED, how="interrupted", generation=self.last_checkpoint)
            if self._await_requeue:
                self._wait_for_requeue()
            if not self.backend.wait_cleanups(CLEANUP_WAIT_SECONDS):
                log.warning("job %s step %s: the store's cleanup after the final checkpoint still runs after %d s; "
                            "the next checkpoint or ckpt gc finishes it", o.job_id, o.step, CLEANUP_WAIT_SECONDS)
            return EXIT_FINAL
        status = 137 if code is None else code
        try:
            self.store.record_result(o.job_id, o.step, status)
        except (OSError, CkptError) as e:  # the tool's status is the answer, whatever happens to the store
            where = getattr(e, "filename", None) or self.store.step_dir(o.job_id, o.step)
            why = getattr(e, "strerror", None) or str(e)
            print(f"ckpt: cannot record that job {o.job_id} step {o.step} finished with status {status} "
                  f"({where}: {why}); a rerun would resume it from its last checkpoint", file=sys.stderr, flush=True)
            log.error("cannot record the result of job %s step %s: %s: %s", o.job_id, o.step, where, why)
            return status
        self._emit(ev.SEGMENT_ENDED, how="completed" if status == 0 else "failed", exit_status=status)
        # a finished step needs no checkpoint: free the space now rather than at job end (gc does it otherwise)
        try:
            self.store.prune(o.job_id, o.step, 0)
            self.store.sweep_chunks(o.job_id)
        except (OSError, CkptError) as e:
            log.warning("cannot remove the checkpoints of finished job %s step %s: %s", o.job_id, o.step, e)
        return status

    def _requeue_to_compatible_cpu(self, refused: IncompatibleCpuError) -> int:
        """CRIU refused the restore on this CPU: never start from zero, never fail. The node agent requeues the
        job to nodes of its checkpoint's CPU family (requeue.py); we wait for that as after a final checkpoint and
        exit 75. When the agent cannot, the refusal stands (exit 69) with its reason."""
        o = self.opts
        print(f"ckpt: this node ({self.node}) cannot restore job {o.job_id} step {o.step}: {refused}; asking the "
              "node agent to requeue the job to nodes of its checkpoint's CPU family", file=sys.stderr, flush=True)
        ended = self._ignore_job_signals()  # the requeue ends the batch script: we still report what happened
        try:
            reply = control.request(o.agent_socket, {"op": "requeue", "job_id": o.job_id, "step": o.step})
        except CkptError as e:
            raise IncompatibleCpuError(f"{refused}; the node agent could not be asked to requeue job {o.job_id} "
                                       f"to a compatible node: {e}") from e
        if not reply.get("ok"):
            raise IncompatibleCpuError(f"{refused}; job {o.job_id} could not be requeued to a compatible node: "
                                       f"{reply.get('error')}")
        print(f"ckpt: checkpoint {reply['generation']} of job {o.job_id} step {o.step} was taken on "
              f"{reply['checkpoint_node']}, whose CPU this node ({self.node}) lacks; job requeued to nodes with "
              f"features {reply['features']}", file=sys.stderr, flush=True)
        self._wait_for_requeue(ended)
        return EXIT_FINAL

    @staticmethod
    def _ignore_job_signals() -> threading.Event:
        """The tool is gone: nothing to forward. Slurm's SIGTERM now means "requeued"; the event records it."""
        ended = threading.Event()
        for s in FORWARDED_SIGNALS:
            signal.signal(s, lambda *_: ended.set())
        return ended

    def _wait_for_requeue(self, ended: Optional[threading.Event] = None) -> None:
        """Exit only once the agent has requeued the job (its marker), or Slurm ends us for that requeue: were the
        batch script to end first, Slurm would record the job FAILED (mail, `afterok` dependents, accounting).
        The tool is stopped by now: the step's run lock goes first, so the requeued job may start at once."""
        self._step_lock.release()
        job_id = self.opts.job_id
        ended = ended or self._ignore_job_signals()
        deadline = time.monotonic() + REQUEUE_WAIT_SECONDS
        while not ended.is_set():
            marker = read_marker(self.opts.runtime_dir, job_id)
            if marker is not None:
                if not marker.get("ok"):
                    print(f"ckpt: the node agent could not requeue job {job_id}: {marker.get('error', '?')}",
                          file=sys.stderr, flush=True)
                return
            if time.monotonic() > deadline:
                print(f"ckpt: job {job_id} was not requeued within {REQUEUE_WAIT_SECONDS} s of its final checkpoint",
                      file=sys.stderr, flush=True)
                return
            ended.wait(REQUEUE_POLL_SECONDS)

    # --- signals, registration, control -------------------------------------------------------------------------
    def _install_signal_forwarding(self, init_pid: int) -> None:
        def forward(signum, _frame):
            try:
                os.kill(init_pid, signum)
            except ProcessLookupError:
                pass

        for s in FORWARDED_SIGNALS:
            signal.signal(s, forward)

    def _register(self) -> None:
        o = self.opts
        d = registration_dir(o.runtime_dir)
        os.makedirs(d, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(d, 0o1777)  # wrappers of ordinary users register here too; sticky like /tmp
        self._reg_path, sock_path = registration_paths(o.runtime_dir, o.job_id, o.step)
        self._server = control.ControlServer(sock_path, self._handle, mode=0o600).start()
        reg = {
            "job_id": o.job_id, "step": o.step, "pid": os.getpid(), "pid_start": process_start_time(os.getpid()),
            "init_pid": self.job.init_pid, "init_start": process_start_time(self.job.init_pid),
            "uid": os.getuid(), "gid": os.getgid(), "node": self.node, "socket": sock_path, "cwd": o.cwd,
            "store": self.store.root, "started": iso(utcnow()), "argv": o.argv,
        }
        write_atomic(self._reg_path, json.dumps(reg).encode(), mode=0o644, durable=False)

    def _unregister(self) -> None:
        if self._server:
            self._server.close()
        if self._reg_path:
            try:
                os.unlink(self._reg_path)
            except OSError:
                pass

    def _handle(self, req: Dict[str, Any], creds, _fds) -> Dict[str, Any]:
        _, uid, _ = creds
        if uid not in (0, os.getuid()):
            return {"ok": False, "error": "only the job's owner or root may checkpoint it", "exit_code": 77}
        op = req.get("op")
        if op == "status":
            return {"ok": True, "job_id": self.opts.job_id, "step": self.opts.step, "init_pid": self.job.init_pid,
                    "last_checkpoint": self.last_checkpoint}
        if op == "checkpoint":
            agent_final = bool(req.get("final") and req.get("await_requeue") and uid == 0)
            if agent_final:
                self._await_requeue = True  # only root (the agent) requeues; set before the tool can end
            res = self.checkpoint(final=bool(req.get("final")), reason=str(req.get("reason") or "manual"),
                                  timeout=req.get("timeout"), may_skip=agent_final)
            return {"ok": True, **res}
        return {"ok": False, "error": f"unknown request {op!r}", "exit_code": 2}

    # --- checkpoints --------------------------------------------------------------------------------------------
    def checkpoint(self, *, final: bool, reason: str, timeout: Optional[float] = None,
                   may_skip: bool = False) -> Dict[str, Any]:
        """One checkpoint. may_skip (the agent's final on a notice, which requeues the job next): when the final
        cannot fit the time left and a recent periodic checkpoint exists, stop the tool without one (final_decision)."""
        o = self.opts
        asked = self.clock()
        with self._ckpt_lock:
            if self._stopped_by_final:
                raise NotFoundError(f"job {o.job_id} step {o.step} was already stopped by a final checkpoint")
            if self._stop.is_set():
                raise NotFoundError(f"job {o.job_id} step {o.step} has already ended")
            if final and may_skip and timeout is not None:
                decision = self.final_decision(float(timeout) - (self.clock() - asked))
                if decision.skip and self._stop_tool():
                    return self._skip_final(decision, reason)
            if not self.instance:  # the agent may have learnt the instance facts after we started
                self.instance = self.job.instance = load_instance(o.runtime_dir)
            self._emit(ev.CHECKPOINT_STARTED, final=final, reason=reason)
            try:
                try:
                    res = self.backend.checkpoint(self.job, final=final, reason=reason, timeout=timeout)
                except OSError as e:  # the engine names paths; this is the net under it
                    raise StoreError(f"{e.filename or self.store.root}: {e.strerror or e}") from e
            except Exception as e:  # whatever failed (a bug too) is recorded; the tool runs on
                error = str(e) if isinstance(e, CkptError) else f"internal error: {type(e).__name__}: {e}"
                self._emit(ev.CHECKPOINT_FAILED, final=final, reason=reason, error=error)
                print(f"ckpt: checkpoint of job {o.job_id} step {o.step} failed: {error}", file=sys.stderr,
                      flush=True)
                raise
            if final:
                self._stopped_by_final = True
            else:
                self._newest_periodic = {"at": self.clock(), "generation": res.generation,
                                         "frozen_seconds": res.frozen_seconds}
            self.last_checkpoint = res.generation
            self._emit(ev.CHECKPOINT_COMMITTED, generation=res.generation, final=final, reason=reason,
                       bytes_in=res.bytes_in, bytes_written=res.bytes_written, bytes_new=res.bytes_new,
                       frozen_seconds=round(res.frozen_seconds, 3), seconds=round(res.total_seconds, 3),
                       pages_unchanged=res.pages_unchanged)
            if final:
                then = ("it resumes when Slurm requeues the job" if o.mode == "transparent"
                        else "run the same command again to resume")
                print(f"ckpt: job {o.job_id} step {o.step} stopped by final checkpoint {res.generation}; {then}",
                      file=sys.stderr, flush=True)
            return {"generation": res.generation, "final": final, "bytes_written": res.bytes_written,
                    "bytes_in": res.bytes_in, "seconds": round(res.total_seconds, 3), "created": res.created,
                    "frozen_seconds": round(res.frozen_seconds, 3)}

    def final_decision(self, time_left: float) -> planner.FinalDecision:
        """Would a final checkpoint now fit the time left (planner.decide_final, from this wrapper's stats)?"""
        newest, rates = self._newest_periodic, self._final_rates
        return planner.decide_final(
            frozen_seconds=newest["frozen_seconds"] if newest else None,
            changed_bytes_per_second=rates.changed_bytes_per_second if rates else None,
            store_bytes_per_second=rates.store_bytes_per_second if rates else None,
            periodic_age_seconds=self.clock() - newest["at"] if newest else None,
            time_left_seconds=time_left,
            recent_seconds=self.opts.recent if self.opts.recent is not None else self.opts.interval)

    def _stop_tool(self) -> bool:
        """Stop the tool as a final checkpoint would (the namespace dies with its init); False if we may not."""
        try:
            os.kill(self.job.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as e:  # then the final checkpoint is tried after all
            log.error("cannot stop job %s step %s without a final checkpoint: %s", self.opts.job_id, self.opts.step,
                      e)
            return False
        self._stopped_by_final = True
        return True

    def _skip_final(self, decision: planner.FinalDecision, reason: str) -> Dict[str, Any]:
        """Called with the checkpoint lock held, the tool stopped: record the decision and answer with the newest
        periodic generation, which the requeued job resumes from."""
        o = self.opts
        generation = self._newest_periodic["generation"]
        self._emit(ev.FINAL_SKIPPED, reason=reason, generation=generation, **decision.to_json())
        print(f"ckpt: a final checkpoint of job {o.job_id} step {o.step} would take about "
              f"{decision.predicted_seconds:.0f} s, {decision.time_left_seconds:.0f} s are left: stopping the job "
              f"to resume from checkpoint {generation}, taken {decision.periodic_age_seconds:.0f} s ago",
              file=sys.stderr, flush=True)
        return {"generation": generation, "final": False, "skipped": True, **decision.to_json()}

    def _periodic(self) -> None:
        """Checkpoint every interval for as long as the tool runs. No failure ends this thread: a failed checkpoint
        (a full or read-only store, a CRIU error, a bug) is recorded as a `checkpoint_failed` event, then retried
        after RETRY_FIRST_SECONDS, doubling up to the interval, so checkpoints resume as soon as the store does."""
        failures = 0
        delay = self.opts.interval
        previous: Optional[float] = None  # when the previous periodic checkpoint started
        while not self._stop.wait(delay):
            started = time.monotonic()
            try:
                res = self.checkpoint(final=False, reason="periodic")
                failures = 0
                if previous is not None:
                    self.plan_deadline(res, started - previous)
                previous = started
            except Exception as e:  # recorded and reported (one stderr line) by checkpoint(); never ends the loop
                failures += 1
                log.debug("periodic checkpoint failed (%d in a row): %s", failures, e, exc_info=True)
            delay = self.interval
            if failures:
                delay = min(self.interval, RETRY_FIRST_SECONDS * 2 ** (failures - 1))

    def plan_deadline(self, res: Dict[str, Any], since_previous: float) -> Optional[planner.IntervalPlan]:
        """After a periodic checkpoint: predict a final one (planner.plan_interval) and, when the interval must
        change for it to fit the notice budget (or may return towards the configured one), change it and record
        the decision (`interval_planned` event, one stderr line)."""
        o = self.opts
        plan = planner.plan_interval(
            interval=o.interval, budget=o.budget, frozen_seconds=res["frozen_seconds"],
            bytes_written=res["bytes_written"], write_seconds=res["seconds"] - res["frozen_seconds"],
            seconds_since_previous=since_previous)
        if plan is not None:
            self._final_rates = plan
        if plan is None or abs(plan.interval_seconds - self.interval) < 1:
            return plan
        self._emit(ev.INTERVAL_PLANNED, previous_interval_seconds=round(self.interval, 3),
                   configured_interval_seconds=o.interval, **plan.to_json())
        print(f"ckpt: a final checkpoint of job {o.job_id} step {o.step} would take about "
              f"{plan.predicted_final_seconds:.0f} s at a {o.interval:g} s interval (budget "
              f"{plan.budget_seconds:g} s): periodic checkpoints every {plan.interval_seconds:.0f} s",
              file=sys.stderr, flush=True)
        self.interval = plan.interval_seconds
        return plan


def _restart_count() -> int:
    """Slurm's SLURM_RESTART_COUNT: how often this job was requeued (0 outside Slurm)."""
    text = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(text) if text.isdigit() else 0
