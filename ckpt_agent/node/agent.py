"""`ckpt agent`: the node daemon. Turns EC2's 2-minute Spot interruption notice into saved work.

On an interruption notice, once per notice:
  1. drain the node, so Slurm starts nothing new here (and the requeued jobs go elsewhere);
  2. take a final checkpoint of every job on the node, in parallel (bounded), against the deadline (the notice's
     time minus a margin for unmounting FSx);
  3. requeue each job as soon as its own final checkpoints are over (requeue.py: constrained to this CPU family,
     without Slurm's two-minute hold), also a job whose final checkpoint failed or ran out of time: it resumes from
     its last periodic checkpoint (a half-written checkpoint never replaces a good one). A wrapper whose final
     checkpoint is predicted not to fit the time left, and whose newest periodic checkpoint is recent, stops the
     tool without one and answers with that checkpoint (runner.final_decision): the job is requeued at once.
     Each `ckpt run` wrapper waits for its job's requeue before it exits 75, so the job never ends FAILED on its way
     back to the queue.
On a rebalance recommendation: the configured action (an immediate non-final checkpoint, drain, or nothing).

The agent also serves the wrappers of ordinary users (privileged.py) on its Unix socket. IMDS errors are logged and
retried; they never stop the agent. SIGTERM stops the loop after the handler in flight has finished.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional

from ckpt_agent.adapters import control
from ckpt_agent.adapters.imds import ImdsClient, RebalanceNotice, SpotNotice
from ckpt_agent.checkpoint.registry import list_registrations, registration_dir
from ckpt_agent.errors import CkptError, ImdsError
from ckpt_agent.node.actions import notice_handler, rebalance_action
from ckpt_agent.node.config import AgentSettings
from ckpt_agent.node.monitor import InterruptionMonitor
from ckpt_agent.node.requeue import Requeuer
from ckpt_agent.store import event_names as ev
from ckpt_agent.store.events import emit
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.util.safeio import write_atomic
from ckpt_agent.util.units import iso_seconds as _iso

log = logging.getLogger(__name__)

REQUEST_SLACK_SECONDS = 5  # beyond the dump deadline, for the wrapper to answer


class NoticeHandler:
    """Decides and acts on notices: checkpoints through the wrappers, then Slurm drain and requeue."""

    def __init__(self, node: str, runtime_dir: str, slurm, store: Optional[CheckpointStore],
                 settings: AgentSettings, instance: Callable[[], Dict[str, Any]],
                 now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.node = node
        self.runtime_dir = runtime_dir
        self.slurm = slurm
        self.store = store
        self.settings = settings
        self.instance = instance
        self.now = now
        self.requeuer = Requeuer(node, runtime_dir, slurm, settings.cpu_families,
                                 emit=self._emit)

    def jobs_here(self) -> List[Dict[str, Any]]:
        """Wrappers registered on this node (the runtime directory is node-local, so every registration in it is a
        job here, whatever node name it carries). A registration must be owned by the uid it names (the directory is
        sticky, so nobody can replace another user's), and its socket must sit in the registration directory."""
        regs = []
        d = os.path.realpath(registration_dir(self.runtime_dir))
        for reg in list_registrations(self.runtime_dir):
            if reg.get("node") != self.node:
                # The registration directory is node-local: whatever registered here runs here. A different name
                # means the agent's node name is wrong (host name vs Slurm node name): say so, and checkpoint.
                log.error("job %s registered under node name %r, but this agent runs as node %r: checkpointing it "
                          "all the same; fix the agent's node name (--node, %s)", reg.get("job_id"), reg.get("node"),
                          self.node, "/etc/parallelcluster/slurm_plugin/slurm_nodename")
            if reg.get("_owner_uid") not in (0, reg.get("uid")):
                log.warning("ignoring registration of job %s: file not owned by uid %s", reg.get("job_id"),
                            reg.get("uid"))
                continue
            if os.path.dirname(os.path.realpath(str(reg.get("socket", "")))) != d:
                continue
            regs.append(reg)
        return regs

    def _emit(self, job_id: str, event: str, **fields: Any) -> None:
        emit(self.store, job_id, event, node=self.node, instance=self.instance(), **fields)

    def checkpoint_one(self, reg: Dict[str, Any], *, final: bool, reason: str,
                       deadline: Optional[datetime]) -> Optional[int]:
        """Ask one wrapper for a checkpoint; its generation, or None on failure. A final checkpoint asked for here
        is followed by a requeue: the wrapper is told to wait for it (`await_requeue`)."""
        key = f"{reg['job_id']}.{reg['step']}"
        remaining = None
        if deadline is not None:
            remaining = (deadline - self.now()).total_seconds()
            if remaining <= 1:
                self._emit(reg["job_id"], ev.CHECKPOINT_FAILED, step=reg["step"], final=final, reason=reason,
                           error="no time left before the deadline")
                return None
        try:
            reply = control.request(reg["socket"], {"op": "checkpoint", "final": final, "reason": reason,
                                                     "timeout": remaining, "await_requeue": final},
                                    timeout=None if remaining is None else remaining + REQUEST_SLACK_SECONDS)
        except CkptError as e:
            log.error("checkpoint of %s failed: %s", key, e)
            return None
        if not reply.get("ok"):
            log.error("checkpoint of %s failed: %s", key, reply.get("error"))
            return None
        if reply.get("skipped"):  # the wrapper's decision (runner.final_decision), recorded as `final_skipped`
            log.warning("final checkpoint of %s skipped: about %.0f s predicted, %.0f s left; it resumes from "
                        "checkpoint %s, %.0f s old", key, reply.get("predicted_seconds") or 0,
                        reply.get("time_left_seconds") or 0, reply["generation"],
                        reply.get("periodic_age_seconds") or 0)
        return int(reply["generation"])

    def checkpoint_all(self, regs: List[Dict[str, Any]], *, final: bool, reason: str,
                       deadline: Optional[datetime]) -> Dict[str, Optional[int]]:
        """Checkpoint every registered job step in parallel; return {job.step: generation or None on failure}."""
        results: Dict[str, Optional[int]] = {}
        if not regs:
            return results
        with concurrent.futures.ThreadPoolExecutor(max(1, self.settings.max_parallel)) as pool:
            futures = {pool.submit(self.checkpoint_one, r, final=final, reason=reason, deadline=deadline):
                       f"{r['job_id']}.{r['step']}" for r in regs}
            for fut, key in futures.items():
                results[key] = fut.result()
        return results

    def final_checkpoints_and_requeue(self, regs: List[Dict[str, Any]], deadline: datetime) -> None:
        """Final checkpoints in parallel; each job is requeued the moment its last step's checkpoint is over."""
        pending: Dict[str, int] = {}
        for r in regs:
            pending[r["job_id"]] = pending.get(r["job_id"], 0) + 1
        all_final: Dict[str, bool] = {job_id: True for job_id in pending}
        for job_id in pending:
            self.requeuer.forget(job_id)
        with concurrent.futures.ThreadPoolExecutor(max(1, self.settings.max_parallel)) as pool:
            futures = {pool.submit(self.checkpoint_one, r, final=True, reason="spot-interruption", deadline=deadline):
                       r for r in regs}
            for fut in concurrent.futures.as_completed(futures):
                reg = futures[fut]
                job_id = reg["job_id"]
                if fut.result() is None:
                    all_final[job_id] = False
                    log.error("no final checkpoint for %s.%s: it resumes from its last periodic checkpoint", job_id,
                              reg["step"])
                pending[job_id] -= 1
                if pending[job_id] == 0:
                    # constrained to this CPU only when every step's newest checkpoint was taken here
                    family = self.requeuer.node_family() if all_final[job_id] else None
                    self.requeuer.requeue(job_id, reason="spot-interruption", family=family)

    def on_spot(self, notice: SpotNotice) -> None:
        deadline = notice.time.astimezone(timezone.utc) - _seconds(self.settings.deadline_margin)
        regs = self.jobs_here()
        job_ids = sorted({r["job_id"] for r in regs})
        log.warning("spot interruption notice: %s at %s; %d job(s) on %s", notice.action, notice.time.isoformat(),
                    len(job_ids), self.node)
        for job_id in job_ids:
            self._emit(job_id, ev.NOTICE_RECEIVED, action=notice.action, notice_time=_iso(notice.time),
                       deadline=_iso(deadline))
        reason = f"spot interruption: instance {notice.action} at {_iso(notice.time)}"
        self._drain(reason, job_ids)
        self.final_checkpoints_and_requeue(regs, deadline)

    def on_rebalance(self, notice: RebalanceNotice) -> None:
        action = self.settings.rebalance_action
        regs = self.jobs_here()
        job_ids = sorted({r["job_id"] for r in regs})
        log.warning("rebalance recommendation at %s: action %s for %d job(s)", _iso(notice.notice_time), action,
                    len(job_ids))
        for job_id in job_ids:
            self._emit(job_id, ev.REBALANCE_RECEIVED, notice_time=_iso(notice.notice_time), action=action)
        rebalance_action(self, action)(regs, job_ids, notice)

    def rebalance_checkpoint(self, regs: List[Dict[str, Any]], job_ids: List[str], notice: RebalanceNotice) -> None:
        self.checkpoint_all(regs, final=False, reason="rebalance", deadline=None)

    def rebalance_drain(self, regs: List[Dict[str, Any]], job_ids: List[str], notice: RebalanceNotice) -> None:
        self._drain(f"rebalance recommendation at {_iso(notice.notice_time)}", job_ids)

    def rebalance_ignore(self, regs: List[Dict[str, Any]], job_ids: List[str], notice: RebalanceNotice) -> None:
        pass  # the rebalance_received event above is the record

    def _drain(self, reason: str, job_ids: List[str]) -> None:
        try:
            self.slurm.drain_node(self.node, reason)
        except CkptError as e:
            log.error("drain of %s failed: %s", self.node, e)
            return
        for job_id in job_ids:
            self._emit(job_id, ev.DRAINED, reason=reason)


class Agent:
    """A fixed-cadence loop: poll, hand each new notice to the handler, sleep the rest of the interval."""

    def __init__(self, monitor: InterruptionMonitor, handler: NoticeHandler, imds: ImdsClient, runtime_dir: str,
                 poll_interval: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Optional[Callable[[float], None]] = None):
        self.monitor = monitor
        self.handler = handler
        self.imds = imds
        self.runtime_dir = runtime_dir
        self.poll_interval = poll_interval
        self.clock = clock
        self._stop = threading.Event()
        self.sleep = sleep or self._stop.wait
        self.instance: Dict[str, Any] = {}

    def stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def refresh_instance(self) -> None:
        """Instance facts for events and for the wrappers (runtime_dir/instance.json); retried until IMDS answers."""
        if self.instance:
            return
        try:
            ident = self.imds.get_instance_identity()
        except ImdsError as e:
            log.warning("instance identity not available yet: %s", e)
            return
        self.instance = {"instance_id": ident.instance_id, "instance_type": ident.instance_type,
                         "availability_zone": ident.availability_zone, "region": ident.region}
        os.makedirs(self.runtime_dir, exist_ok=True)
        write_atomic(os.path.join(self.runtime_dir, "instance.json"), json.dumps(self.instance).encode(),
                     mode=0o644, durable=False)

    def poll_once(self) -> None:
        self.refresh_instance()
        try:
            notices = self.monitor.poll()
        except ImdsError as e:
            log.warning("IMDS poll failed (retrying): %s", e)
            return
        for notice in notices:
            handle = notice_handler(self.handler, notice)  # None: an unknown kind, logged
            if handle is None:
                continue
            try:
                handle(notice)
            except Exception:  # one bad notice must not stop the agent
                log.exception("handling %r failed", notice)

    def run(self) -> None:
        log.info("ckpt agent polling %s every %g s on node %s", self.imds.base_url, self.poll_interval,
                 self.handler.node)
        while not self._stop.is_set():
            started = self.clock()
            self.poll_once()
            self.sleep(max(0.0, self.poll_interval - (self.clock() - started)))


def _seconds(n: float):
    from datetime import timedelta

    return timedelta(seconds=n)
