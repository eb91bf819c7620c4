"""Requeueing a job after its final checkpoint: in the right order, to a CPU that can restore it, without Slurm's
two-minute hold. The node agent's NoticeHandler calls `Requeuer.requeue` for each job as soon as that job's own
final checkpoints are over (never waiting for the node's other jobs).

Plan for one job:
  1. `scontrol requeue`: the job is PENDING from now on (accounting records REQUEUED, never FAILED);
  2. the marker <runtime_dir>/requeued/<job>.json: the job's `ckpt run` wrappers, which after a final checkpoint the
     agent asked for wait for it (bounded) before they exit 75, so the batch script can only end after the requeue
     (the order is right by construction, however slow scontrol is and however many jobs the node runs);
  3. when the final checkpoint was taken here: constrain the pending job to nodes of this node's CPU family
     (`Features=`), so it is restored only where CRIU's CPU check (`--cpu-cap=fpu,ins`) passes;
  4. in the background, once the old batch step is gone: `StartTime=now` (see `expedite`).

A restore that CRIU still refuses on a node's CPU (a job Slurm requeued by itself, without our constraint) comes
back here through the agent's socket: `requeue_to_checkpoint_family` requeues the job to the family of the node its
checkpoint was taken on (the wrapper cannot: a constraint changes only on a pending job, and by then Slurm has ended
every process of the job).

Why not `RequeueExit=75` in slurm.conf (ParallelCluster allows it in CustomSlurmSettings): slurmctld would put
back PENDING any batch job of the cluster whose script exits 75 (`_set_job_requeue_exit_value()` in job_mgr.c;
`RequeueExitHold` would hold it instead; `--no-requeue` overrides both), EX_TEMPFAIL which tools use for their own
temporary failures, also after a `ckpt checkpoint --final` a user meant as "stop here"; and a script that runs
`ckpt run ... || true` would never be requeued. The agent knows which jobs it moved, so it requeues exactly those.

Why `StartTime=now` (and not a short `AuthInfo=cred_expire`): slurmctld makes a requeued batch job wait
cred_expire + 1 s (default 121 s; `batch_requeue_fini()` in job_mgr.c) so that a new launch credential is newer
than the revocation slurmd recorded for the old one on the old node, and the old node has purged the job. Both are
per node (slurmd's cred_context.c: `cred_revoke()`, `cred_revoked()` compare the credential's ctime with the
revocation time of that job id on that node; a credential also names its nodes). We act only once the old batch
step is gone (the job is PENDING without COMPLETING, which is when slurmctld ran batch_requeue_fini), at least
REVOKE_MARGIN_SECONDS after the requeue, and the old node is drained, so the job starts elsewhere with a fresh
credential. `cred_expire` stays as it is: it is also the window in which slurmd remembers credentials to refuse
replays, and it bounds how long a launch may take (a prolog longer than it fails), so it is not ours to shorten
cluster-wide. Slurm 25.11's `SchedulerParameters=requeue_delay=` sets that wait apart from cred_expire, but
ParallelCluster writes SchedulerParameters itself (nohold_on_prolog_fail): a CustomSlurmSettings line would have to
repeat its value and follow its changes, and would shorten the wait also for jobs the agent did not move.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from ckpt_agent.adapters.slurm import JobNotFound
from ckpt_agent.errors import CkptError, ConfigError, SlurmError
from ckpt_agent.store import event_names as ev
from ckpt_agent.util.safeio import write_atomic

log = logging.getLogger(__name__)

REVOKE_MARGIN_SECONDS = 2  # a new launch credential must be newer (in whole seconds) than the old one's revocation
EXPEDITE_TIMEOUT_SECONDS = 180  # ParallelCluster's UnkillableStepTimeout: a step not gone by then is stuck
EXPEDITE_POLL_SECONDS = 0.5
# How scontrol shows a requeued job while its old batch step and epilog still run (job_state_string(): the
# COMPLETING and REQUEUE flags win over the base state PENDING).
_STILL_ENDING = ("COMPLETING", "REQUEUED", "REQUEUE_FED")


def marker_dir(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, "requeued")


def marker_path(runtime_dir: str, job_id: str) -> str:
    return os.path.join(marker_dir(runtime_dir), f"{job_id}.json")


def read_marker(runtime_dir: str, job_id: str) -> Optional[dict]:
    """The agent's word on the job's requeue ({"ok": bool, ...}), None while there is none."""
    try:
        with open(marker_path(runtime_dir, job_id), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def family_constraint(node_features: List[str], cpu_families: List[str]) -> Optional[str]:
    """The `cpu_families` entry ("r6i.4xlarge|r6i.8xlarge") naming one of this node's features, None if none."""
    mine = set(node_features)
    for family in cpu_families:
        if mine & set(family.split("|")):
            return family
    return None


def combine_features(current: str, family: str, cpu_families: List[str]) -> str:
    """The job's new constraint: its own --constraint AND the CPU family (an earlier family of ours is replaced)."""
    current = "" if current in ("", "(null)") else current
    ours = {f"({f})" if "|" in f else f for f in cpu_families}
    term = f"({family})" if "|" in family else family
    parts = [p for p in current.split("&") if p and p not in ours]
    return "&".join(parts + [term])


class Requeuer:
    """Requeues jobs of this node through the Slurm adapter; `emit(job_id, event, **fields)` records events."""

    def __init__(self, node: str, runtime_dir: str, slurm, cpu_families: List[str],
                 emit: Callable[..., None], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.node = node
        self.runtime_dir = runtime_dir
        self.slurm = slurm
        self.cpu_families = list(cpu_families)
        self.emit = emit
        self.clock = clock
        self.sleep = sleep
        self._family: Optional[str] = None
        self.last_features: Optional[str] = None
        self.threads: List[threading.Thread] = []

    def forget(self, job_id: str) -> None:
        """Remove a marker of an earlier requeue of this job, before its wrappers are asked for a final checkpoint."""
        try:
            os.unlink(marker_path(self.runtime_dir, job_id))
        except FileNotFoundError:
            pass

    def node_family(self) -> Optional[str]:
        if self._family is None and self.cpu_families:
            try:
                self._family = family_constraint(self.slurm.node_features(self.node), self.cpu_families)
            except CkptError as e:
                log.error("cannot read the features of node %s: %s", self.node, e)
            if self._family is None:
                log.error("node %s has none of the CPU-family features %s: requeued jobs are not constrained",
                          self.node, ", ".join(self.cpu_families))
        return self._family

    def requeue(self, job_id: str, *, reason: str, family: Optional[str]) -> bool:
        """Steps 1-4 of the module's plan, constrained to `family` (a cpu_families entry) unless None; True when
        Slurm took the job back."""
        try:
            self.slurm.requeue(job_id)
        except CkptError as e:
            log.error("requeue of job %s failed: %s", job_id, e)
            self._mark(job_id, ok=False, error=str(e))
            self.emit(job_id, ev.REQUEUE_FAILED, error=str(e))
            return False
        requeued_at = self.clock()
        self._mark(job_id, ok=True)
        features = None
        if family:
            try:
                current = self.slurm.job_info(job_id).raw.get("Features", "")
                features = combine_features(current, family, self.cpu_families)
                self.slurm.set_job_features(job_id, features)
            except CkptError as e:
                log.error("cannot constrain job %s to CPU family %s: %s", job_id, family, e)
                features = None
        self.emit(job_id, ev.REQUEUED, reason=reason, features=features or "")
        self.last_features = features
        t = threading.Thread(target=self.expedite, args=(job_id, requeued_at), name=f"expedite-{job_id}",
                             daemon=True)
        t.start()
        self.threads = [x for x in self.threads if x.is_alive()] + [t]
        return True

    def requeue_to_checkpoint_family(self, job_id: str, checkpoint_node: str) -> Dict[str, Any]:
        """A wrapper's restore was refused on this node's CPU: requeue its job to the family of the node its
        checkpoint was taken on. The wrapper cannot do it itself: a job's constraint can change only once the job
        is pending, and by then Slurm has ended the batch script and every process of the job. Raises ConfigError
        when that family cannot be told (the job must then fail loudly rather than start from zero)."""
        if not self.cpu_families:
            raise ConfigError("no CPU families configured (agent.cpu_families): no node known to restore it")
        family = family_constraint(self.slurm.node_features(checkpoint_node), self.cpu_families)
        if family is None:
            raise ConfigError(f"node {checkpoint_node}, where the checkpoint was taken, has none of the CPU-family "
                              f"features {', '.join(self.cpu_families)}")
        if family == self.node_family():  # sending it back to this family would bring it back here, again and again
            raise ConfigError(f"this node ({self.node}) is of the checkpoint's CPU family {family}, yet CRIU refused: "
                              "agent.cpu_families groups CPUs that differ")
        self.forget(job_id)
        if not self.requeue(job_id, reason="incompatible-cpu", family=family):
            raise SlurmError(f"requeue of job {job_id} failed")
        return {"features": self.last_features or "", "family": family, "checkpoint_node": checkpoint_node}

    def expedite(self, job_id: str, requeued_at: float) -> None:
        """Once the old batch step is gone, let the job start at once instead of after cred_expire + 1 s."""
        deadline = requeued_at + EXPEDITE_TIMEOUT_SECONDS
        while True:
            try:
                info = self.slurm.job_info(job_id)
            except JobNotFound:
                return
            except CkptError as e:
                log.warning("job %s: cannot follow its requeue: %s", job_id, e)
                info = None
            if info is not None:
                if info.state == "PENDING":
                    if info.reason != "BeginTime":
                        return  # eligible already, or held by someone: nothing to cut
                    break
                if info.state not in _STILL_ENDING:
                    return  # started again, or cancelled
            if self.clock() > deadline:
                log.warning("job %s: old batch step still there after %d s; Slurm's requeue delay applies", job_id,
                            EXPEDITE_TIMEOUT_SECONDS)
                return
            self.sleep(EXPEDITE_POLL_SECONDS)
        wait = requeued_at + REVOKE_MARGIN_SECONDS - self.clock()
        if wait > 0:
            self.sleep(wait)
        try:
            self.slurm.start_now(job_id)
        except CkptError as e:
            log.warning("job %s: cannot cut the requeue delay: %s", job_id, e)
            return
        self.emit(job_id, ev.REQUEUE_EXPEDITED, seconds=round(self.clock() - requeued_at, 3))

    def _mark(self, job_id: str, **fields) -> None:
        d = marker_dir(self.runtime_dir)
        try:
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
            write_atomic(marker_path(self.runtime_dir, job_id), json.dumps({"job_id": job_id, **fields}).encode(),
                         mode=0o644, durable=False)
        except OSError as e:
            log.error("cannot write the requeue marker of job %s: %s", job_id, e)
