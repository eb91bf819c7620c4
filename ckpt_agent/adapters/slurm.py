"""Slurm adapter: the few controller operations the agent, `ckpt run` and gc need, over scontrol/squeue/sacct.

Commands run through `ckpt_agent.util.proc.run` as argv lists (never a shell). Every failure becomes a SlurmError whose
one line names the command and Slurm's own message; a job Slurm does not know raises JobNotFound (a SlurmError).
Job ids are checked before they reach a command line: "123", array tasks "123_4", and Slurm's task ranges
"123_[1-3,7]" are accepted; anything else (an option in disguise) is refused.

Job states for gc never guess: squeue covers every job slurmctld still holds (running, pending and finished jobs
younger than MinJobAge), sacct covers older ones when accounting is enabled, and a job unknown to both is
"UNKNOWN". When slurmctld cannot be asked, or accounting is configured but fails, SlurmError is raised.

Where the commands are: `slurm_bin_dir(configured)` decides, once, for every caller (agent, gc, report): the
configured directory (agent.yaml `slurm_bin_dir`), else ParallelCluster's /opt/slurm/bin when it holds scontrol, else
PATH. ParallelCluster adds /opt/slurm/bin to PATH only in /etc/profile.d/slurm.sh, which systemd units never read.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Dict, Iterable, List, Mapping, Optional

from ckpt_agent.errors import EXIT_NOT_FOUND, CommandError, SlurmError
from ckpt_agent.util import proc

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 20  # twice Slurm's default MessageTimeout: a slow controller answers, a dead one is noticed
# Slurm's job states (squeue/sacct words). A job in a final state will never run again; anything else that is not
# UNKNOWN counts as live, so a state added by a future Slurm keeps its checkpoints.
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
})
LIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED", "CONFIGURING",
    "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "UPDATE_DB", "POWER_UP_NODE",
})
UNKNOWN = "UNKNOWN"  # what a job Slurm does not know (any more) is
_JOB_ID = re.compile(r"^\d+(_(\d+|\[[\d,\-]+\]))?$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-\[\],]*$")
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_:/]*=")
# A node-feature expression as --constraint takes it: names joined by | and &, optionally grouped with ( ).
_FEATURES = re.compile(r"^[A-Za-z0-9_.\-|&()]+$")
_EMPTY_TIMES = ("", "Unknown", "None", "N/A", "(null)")
_NOT_FOUND_MARKERS = ("Invalid job id specified", "Invalid job id", "Job has already finished")
_ACCOUNTING_DISABLED = "accounting storage is disabled"
# ParallelCluster builds Slurm with --prefix=/opt/slurm (cookbook recipes/install/install_slurm.rb).
PCLUSTER_SLURM_BIN_DIR = "/opt/slurm/bin"


def slurm_bin_dir(configured: str = "", default: str = PCLUSTER_SLURM_BIN_DIR) -> Optional[str]:
    """The directory of scontrol/squeue/sacct: `configured` if set, else `default` when it holds scontrol, else None
    (the commands are looked up on PATH)."""
    if configured:
        return configured
    if os.path.isfile(os.path.join(default, "scontrol")):
        return default
    return None


class JobNotFound(SlurmError):
    """Slurm does not know this job (any more)."""

    exit_code = EXIT_NOT_FOUND


@dataclass
class JobInfo:
    """One job as `scontrol show job` reports it. Times are aware datetimes (Slurm prints local time) or None."""

    job_id: str  # as Slurm displays it: "123", or "123_4" for an array task
    state: str  # RUNNING, PENDING, COMPLETED, CANCELLED, ... (without flags such as "+")
    user: str
    uid: int
    gid: int
    nodes: str  # compressed host list ("node[1-2]"), "" when none is allocated
    restart_count: int
    submit_time: Optional[datetime]
    start_time: Optional[datetime]
    end_time: Optional[datetime]
    requeue: bool  # the job may be requeued (Requeue=1)
    exit_code: str  # "code:signal" as Slurm prints it, e.g. "0:0"
    reason: str = ""
    batch_host: str = ""
    work_dir: str = ""
    std_out: str = ""
    numeric_id: str = ""  # Slurm's internal job id (differs from job_id for array tasks)
    raw: Dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class NodeInfo:
    name: str
    state: str  # as scontrol prints it, e.g. "IDLE", "MIXED+DRAIN", "DOWN+NOT_RESPONDING"
    reason: str = ""
    raw: Dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def drained(self) -> bool:
        return "DRAIN" in self.state


def parse_record(line: str) -> Dict[str, str]:
    """One `scontrol show ... -o` line as a dict. Values may contain spaces (JobName, Reason): a word without
    `Key=` continues the previous value."""
    record: Dict[str, str] = {}
    key = None
    for word in line.strip().split(" "):
        if _KEY.match(word):
            key, _, value = word.partition("=")
            record[key] = value
        elif key is not None:
            record[key] += " " + word
    return record


def parse_time(value: str) -> Optional[datetime]:
    """A Slurm timestamp ("2026-11-29T03:38:16", local time) as an aware datetime, None for Unknown/None."""
    if value is None or value.strip() in _EMPTY_TIMES:
        return None
    try:
        return datetime.strptime(value.strip(), "%Y-%m-%dT%H:%M:%S").astimezone()
    except ValueError:
        return None


def _id_and_name(value: str) -> tuple:
    """"ckpt-u1(1001)" -> ("ckpt-u1", 1001)."""
    m = re.match(r"^(.*)\((\d+)\)$", value or "")
    if m:
        return m.group(1), int(m.group(2))
    return value or "", -1


def job_info_from_record(rec: Mapping[str, str]) -> JobInfo:
    user, uid = _id_and_name(rec.get("UserId", ""))
    _, gid = _id_and_name(rec.get("GroupId", ""))
    numeric = rec.get("JobId", "")
    array_job, array_task = rec.get("ArrayJobId"), rec.get("ArrayTaskId")
    shown = f"{array_job}_{array_task}" if array_job and array_task else numeric
    nodes = rec.get("NodeList", "")
    return JobInfo(
        job_id=shown,
        state=rec.get("JobState", UNKNOWN).split("+")[0],
        user=user,
        uid=uid,
        gid=gid,
        nodes="" if nodes in ("(null)", "") else nodes,
        restart_count=int(rec.get("Restarts", "0") or 0),
        submit_time=parse_time(rec.get("SubmitTime", "")),
        start_time=parse_time(rec.get("StartTime", "")),
        end_time=parse_time(rec.get("EndTime", "")),
        requeue=rec.get("Requeue", "0") == "1",
        exit_code=rec.get("ExitCode", ""),
        reason=rec.get("Reason", ""),
        batch_host=rec.get("BatchHost", ""),
        work_dir=rec.get("WorkDir", ""),
        std_out=rec.get("StdOut", ""),
        numeric_id=numeric,
        raw=dict(rec),
    )


def check_job_id(job_id) -> str:
    text = str(job_id).strip()
    if not _JOB_ID.match(text):
        raise SlurmError(f"not a Slurm job id: {job_id!r}")
    return text


def check_node(node: str) -> str:
    if not isinstance(node, str) or not _NODE.match(node):
        raise SlurmError(f"not a Slurm node name: {node!r}")
    return node


class Slurm:
    """The controller, through its client commands. `env` is merged over os.environ (e.g. {"SLURM_CONF": ...})."""

    def __init__(
        self,
        run: Callable[..., proc.Result] = proc.run,
        bin_dir: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        env: Optional[Mapping[str, str]] = None,
    ):
        self._run = run
        self.bin_dir = bin_dir
        self.timeout = timeout
        self.env = dict(env) if env else None

    @classmethod
    def from_config(cls, cfg) -> Slurm:
        """The controller as agent.yaml (`slurm_bin_dir`) places its commands."""
        return cls(bin_dir=slurm_bin_dir(getattr(cfg, "slurm_bin_dir", "") or ""))

    # -- nodes -------------------------------------------------------------------------------------------------

    def drain_node(self, node: str, reason: str) -> None:
        """Take `node` out of scheduling; running jobs keep running until requeued or finished."""
        reason = " ".join(str(reason).split()) or "drained by ckpt"
        self._scontrol(["update", f"NodeName={check_node(node)}", "State=DRAIN", f"Reason={reason}"])
        log.info("drained node %s: %s", node, reason)

    def resume_node(self, node: str) -> None:
        self._scontrol(["update", f"NodeName={check_node(node)}", "State=RESUME"])
        log.info("resumed node %s", node)

    def node_info(self, node: str) -> NodeInfo:
        out = self._scontrol(["show", "node", "-o", check_node(node)]).stdout
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            raise SlurmError(f"scontrol show node {node}: no such node")
        rec = parse_record(lines[0])
        return NodeInfo(name=rec.get("NodeName", node), state=rec.get("State", UNKNOWN), reason=rec.get("Reason", ""),
                        raw=rec)

    def node_state(self, node: str) -> str:
        """The node's state as scontrol prints it, e.g. "IDLE", "ALLOCATED+DRAIN", "DOWN+NOT_RESPONDING"."""
        return self.node_info(node).state

    def node_features(self, node: str) -> List[str]:
        """The node's available features (slurm.conf Features=; ParallelCluster adds the instance type when a
        compute resource has a single one)."""
        value = self.node_info(node).raw.get("AvailableFeatures", "")
        return [] if value in _EMPTY_TIMES else [f for f in value.split(",") if f]

    def ping(self) -> bool:
        """True when the primary slurmctld answers. Raises SlurmError only if scontrol itself cannot run."""
        try:
            result = self._call("scontrol", ["ping"], ok_codes=(0, 1))
        except SlurmError:
            return False
        return result.returncode == 0 and " is UP" in result.stdout

    # -- jobs --------------------------------------------------------------------------------------------------

    def requeue(self, job_id) -> None:
        """Hand a running job back to the queue: it keeps its id and restarts with SLURM_RESTART_COUNT + 1."""
        self._scontrol(["requeue", check_job_id(job_id)])
        log.info("requeued job %s", job_id)

    def set_job_features(self, job_id, features: str) -> None:
        """Constrain a pending job to nodes matching `features` (replaces the job's --constraint)."""
        if not isinstance(features, str) or not _FEATURES.match(features):
            raise SlurmError(f"not a node-feature expression: {features!r}")
        self._scontrol(["update", f"JobId={check_job_id(job_id)}", f"Features={features}"])
        log.info("job %s constrained to features %s", job_id, features)

    def start_now(self, job_id) -> None:
        """Make a pending job eligible at once (its begin time becomes now)."""
        self._scontrol(["update", f"JobId={check_job_id(job_id)}", "StartTime=now"])
        log.info("job %s eligible to start now", job_id)

    def job_info(self, job_id) -> JobInfo:
        """The job as slurmctld knows it (while running, pending, or finished within MinJobAge)."""
        job_id = check_job_id(job_id)
        out = self._scontrol(["show", "job", "-o", job_id]).stdout
        records = [job_info_from_record(parse_record(line)) for line in out.splitlines() if "JobId=" in line]
        if not records:
            raise JobNotFound(f"job {job_id}: unknown to Slurm")
        for info in records:
            if job_id in (info.job_id, info.numeric_id):
                return info
        return records[0]

    def job_states(self, job_ids: Iterable) -> Dict[str, str]:
        """{job id: state} for gc. States are Slurm's words (RUNNING, COMPLETED, ...) or "UNKNOWN" when neither
        slurmctld nor accounting knows the job. Raises SlurmError when Slurm cannot be asked."""
        wanted = [check_job_id(j) for j in job_ids]
        if not wanted:
            return {}
        known = self._squeue_states()
        states = {j: known[j] for j in wanted if j in known}
        missing = [j for j in wanted if j not in states]
        if missing:
            states.update(self._sacct_states(missing))
        return {j: states.get(j, UNKNOWN) for j in wanted}

    def _squeue_states(self) -> Dict[str, str]:
        # -t all: finished jobs too, as long as slurmctld holds them; -r: one line per array task.
        out = self._call("squeue", ["-h", "-r", "-t", "all", "-o", "%i|%A|%T"]).stdout
        states: Dict[str, str] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                shown, numeric, state = parts
                states[shown] = state
                states.setdefault(numeric, state)
        return states

    def job_partitions(self, job_ids: Iterable) -> Dict[str, str]:
        """{job id: partition} for the jobs Slurm still knows (squeue, then sacct); unknown jobs are left out."""
        wanted = [check_job_id(j) for j in job_ids]
        if not wanted:
            return {}
        out = self._call("squeue", ["-h", "-r", "-t", "all", "-o", "%i|%A|%P"]).stdout
        known: Dict[str, str] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                known[parts[0]] = parts[2]
                known.setdefault(parts[1], parts[2])
        found = {j: known[j] for j in wanted if j in known}
        missing = [j for j in wanted if j not in found]
        if missing:
            try:
                out = self._call("sacct", ["-n", "-P", "-X", "-o", "JobID,Partition", "-j", ",".join(missing)]).stdout
            except SlurmError as e:
                if _ACCOUNTING_DISABLED not in str(e).lower():
                    raise
                out = ""
            for line in out.splitlines():
                parts = line.strip().split("|")
                if len(parts) == 2 and parts[0] in missing and parts[1]:
                    found[parts[0]] = parts[1]
        return found

    def _sacct_states(self, job_ids: List[str]) -> Dict[str, str]:
        argv = ["-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)]
        try:
            out = self._call("sacct", argv).stdout
        except SlurmError as e:
            if _ACCOUNTING_DISABLED in str(e).lower():
                log.debug("sacct: accounting storage is disabled; older jobs are UNKNOWN")
                return {}
            raise
        states: Dict[str, str] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 2 and parts[0]:
                states[parts[0]] = parts[1].split()[0] if parts[1].split() else UNKNOWN  # "CANCELLED by 1001"
        return states

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _scontrol(self, args: List[str]) -> proc.Result:
        return self._call("scontrol", args)

    def _call(self, command: str, args: List[str], ok_codes=(0,)) -> proc.Result:
        binary = os.path.join(self.bin_dir, command) if self.bin_dir else command
        env = {**os.environ, **self.env} if self.env else None
        try:
            result = self._run([binary, *args], timeout=self.timeout, ok_codes=ok_codes, env=env)
        except CommandError as e:
            shown = " ".join([command, *args])
            detail = e.stderr.strip().splitlines()[-1] if e.stderr.strip() else str(e)
            detail = re.sub(r"^\S+: (error: )?", "", detail) if detail.startswith(command) else detail
            error = JobNotFound if any(marker in detail for marker in _NOT_FOUND_MARKERS) else SlurmError
            raise error(f"{shown}: {detail} (exit {e.returncode})") from e
        # sacct reports "accounting storage is disabled" on stderr with exit status 0 or 1 depending on version.
        if command == "sacct" and _ACCOUNTING_DISABLED in (result.stderr or "").lower():
            raise SlurmError(f"sacct: Slurm {_ACCOUNTING_DISABLED}")
        return result
