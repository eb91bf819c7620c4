"""The agent's service for the `ckpt run` wrappers of ordinary users: CRIU needs root, jobs run as their users.

A privilege boundary. It was measured on these machines that a root `criu restore` of a user-edited image grants
any uid and any capabilities, so:
- every request names a job; the requester (peer credentials from the kernel) must be the job's owner in Slurm;
- a checkpoint is taken only of a process tree running as the requester, rooted at one of our namespace inits;
- a restore uses only checkpoints signed with the agent's key (users cannot read it), whose manifest names the
  requester as the job's user, so the restored processes get exactly the uid, gids and capabilities they had;
- files are put back with the user's file-system identity, and processes start and restore inside the requesting
  wrapper's cgroups, so `scancel` and Slurm's accounting cover them;
- the agent writes chunks owned by the job's user in the job's 0700 directory: other users cannot read them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Tuple

from ckpt_agent.checkpoint import launcher
from ckpt_agent.checkpoint.engine import Engine, JobState
from ckpt_agent.errors import PermissionDenied, UsageError
from ckpt_agent.node.requeue import Requeuer
from ckpt_agent.store.layout import check_name
from ckpt_agent.store.manifest import Manifest
from ckpt_agent.util.units import check_seconds
from ckpt_agent.util.usercreds import creds_of

log = logging.getLogger(__name__)

PIPE_KEYS = ("stdout", "stderr", "status")


class PrivilegedService:
    def __init__(self, engine: Engine, owner_of: Callable[[str], int], node: str = "",
                 requeuer: Optional[Requeuer] = None):
        """owner_of(job_id) -> uid of the job's owner (from Slurm); raises when it cannot be told."""
        self.engine = engine
        self.owner_of = owner_of
        self.node = node
        self.requeuer = requeuer  # for "requeue": a restore refused on this CPU (requeue.py)

    def handle(self, req: Dict[str, Any], creds: Tuple[int, int, int], fds: List[int]) -> Dict[str, Any]:
        pid, uid, _gid = creds
        op = req.get("op")
        job_id = check_name("job id", str(req.get("job_id", "")))
        step = check_name("step name", str(req.get("step", "")))
        self._authorize(job_id, uid)
        if op in ("launch", "restore"):  # a job (re)starts: staging images of checkpointers that died go
            self.engine.sweep_staging()
            reply = self._launch(req, pid, fds) if op == "launch" else self._restore(job_id, step, pid, uid, fds)
            # what the job's first checkpoint would measure is measured now, in the background (store/chunks.py),
            # once the restore is done: it is bound by the CPU too
            self.engine.warm_up()
            return reply
        if op == "checkpoint":
            return self._checkpoint(req, job_id, step, pid, uid)
        if op == "requeue" and self.requeuer is not None:
            gen = self.engine.store.latest_generation(job_id, step)
            node = self.engine.store.load_manifest(gen, require_signature=uid != 0).node
            return {"ok": True, "generation": gen.number, **self.requeuer.requeue_to_checkpoint_family(job_id, node)}
        raise UsageError(f"unknown request {op!r}")

    def _authorize(self, job_id: str, uid: int) -> None:
        if uid == 0:
            return
        owner = self.owner_of(job_id)
        if owner != uid:
            raise PermissionDenied(f"uid {uid} may not checkpoint or restore job {job_id}: it belongs to uid {owner}")

    def _pipes(self, fds: List[int]) -> Dict[str, int]:
        if len(fds) != len(PIPE_KEYS):
            raise UsageError(f"expected {len(PIPE_KEYS)} pipe descriptors (stdout, stderr, status), got {len(fds)}")
        return dict(zip(PIPE_KEYS, fds))

    def _launch(self, req: Dict[str, Any], pid: int, fds: List[int]) -> Dict[str, Any]:
        pipes = self._pipes(fds)
        argv, cwd, env = req.get("argv"), req.get("cwd"), req.get("env")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise UsageError("launch needs argv, a non-empty list of strings")
        if not isinstance(cwd, str) or not isinstance(env, dict):
            raise UsageError("launch needs cwd and env")
        user = creds_of(pid)  # exactly the wrapper's uid, gid and groups: the job's
        init_pid = launcher.launch(argv, cwd, {str(k): str(v) for k, v in env.items()}, pipes["stdout"],
                                   pipes["stderr"], pipes["status"], creds=user, cgroup_pid=pid)
        log.info("launched %s for uid %d as namespace init %d", argv[0], user.uid, init_pid)
        return {"ok": True, "init_pid": init_pid}

    def _restore(self, job_id: str, step: str, pid: int, uid: int, fds: List[int]) -> Dict[str, Any]:
        pipes = self._pipes(fds)
        user = creds_of(pid)

        def same_user(manifest: Manifest) -> None:
            if uid != 0 and manifest.uid != uid:
                raise PermissionDenied(
                    f"checkpoint of job {job_id} belongs to uid {manifest.uid}, not to uid {uid}")

        res = self.engine.restore(job_id, step, pipes, require_signature=True, creds=user,
                                  check_manifest=same_user, cgroup_pid=pid)
        out = asdict(res)
        out["ok"] = True
        return out

    def _checkpoint(self, req: Dict[str, Any], job_id: str, step: str, pid: int, uid: int) -> Dict[str, Any]:
        timeout = req.get("timeout")
        try:  # checked before anything is frozen: nan or inf would fail only after the dump started
            timeout = check_seconds(timeout, "timeout") if timeout is not None else None
        except ValueError as e:
            raise UsageError(str(e)) from None
        init_pid = int(req.get("init_pid", 0))
        self._check_tree(init_pid, uid)
        user = creds_of(pid)
        job = JobState(
            job_id=job_id, step=step, init_pid=init_pid, cwd=str(req.get("cwd", "/")),
            argv=[str(a) for a in req.get("argv", [])],
            pipe_inodes={k: int(v) for k, v in (req.get("pipe_inodes") or {}).items() if k in PIPE_KEYS},
            uid=user.uid, gid=user.gid, groups=user.groups, exclude={str(p) for p in req.get("exclude", [])},
            node=str(req.get("node", self.node)), instance=dict(req.get("instance") or {}),
        )
        res = self.engine.checkpoint(job, final=bool(req.get("final")), reason=str(req.get("reason", "manual")),
                                     timeout=timeout)
        out = asdict(res)
        out["ok"] = True
        return out

    @staticmethod
    def _check_tree(init_pid: int, uid: int) -> None:
        """The tree to dump must be one of our namespace inits running a job of the requester: nsinit started with
        `--as <requester's uid>` (or by root), in a PID namespace of its own."""
        try:
            with open(f"/proc/{init_pid}/cmdline", "rb") as fh:
                cmdline = fh.read().split(b"\0")
            own_ns = os.readlink("/proc/self/ns/pid")
            its_ns = os.readlink(f"/proc/{init_pid}/ns/pid")
            init_uid = creds_of(init_pid).uid
        except OSError:
            raise PermissionDenied(f"process {init_pid} is not a running job") from None
        is_nsinit, runs_as = launcher.nsinit_runs_as(cmdline)
        if its_ns == own_ns or not is_nsinit:
            raise PermissionDenied(f"process {init_pid} is not the init of a job started by ckpt run")
        if uid == 0:
            return
        if runs_as is None and init_uid != 0:
            runs_as = init_uid
        if runs_as != uid:
            raise PermissionDenied(f"process {init_pid} runs a job of uid {runs_as}, not of uid {uid}")
