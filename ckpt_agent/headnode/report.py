"""`ckpt report`: what each job's run segments, checkpoints and interruptions cost, from the recorded events.

Inputs are the events the `ckpt run` wrapper and the node agent append to <store>/<job>/events.jsonl (and the copies
`ckpt gc` keeps in <store>/.history/ when it removes a job), optionally Slurm's submission time, and a price table
{instance type: {spot, ondemand}} in USD per instance-hour. Definitions (docs/gc-and-report.md):

- segment: one run of a step on one instance, from `segment_started` to `segment_ended` (completed, failed,
  interrupted). A segment with no end that was followed by another segment (a restore) ended `lost`, at the last
  event recorded for it; one with no end and nothing after it is `running` while Slurm says the job is live
  (counted up to now), else `lost`.
- work lost: of an interrupted or lost segment, the time from the state its last checkpoint captured (or from the
  segment's start, when it took none) to its end; completed and failed segments lose nothing.
- compute: the sum of segment durations; net runtime = compute - work lost; wall clock = submission (Slurm, else
  the first event) to the end of the last segment (now while running).
- cost: each segment's instance-hours at the Spot price; the On-Demand comparison prices the net runtime, since an
  On-Demand run is not interrupted. Savings = On-Demand - Spot. A job is charged whole instances.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from ckpt_agent.adapters.slurm import FINAL_STATES, UNKNOWN
from ckpt_agent.store import event_names as ev
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.store.layout import EVENTS, HISTORY_DIR
from ckpt_agent.util.units import human_bytes, iso_seconds

log = logging.getLogger(__name__)

JOB_EVENTS = ev.JOB_EVENTS


def parse_time(value: Any) -> Optional[dt.datetime]:
    """An ISO time as the wrapper ("...T03:38:16.123456Z") or the agent ("...T03:38:16Z") writes it, aware UTC."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        try:
            t = dt.datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
        except ValueError:
            return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _iso(t: Optional[dt.datetime]) -> Optional[str]:
    return iso_seconds(t) if t else None


@dataclass
class Segment:
    step: str
    node: str
    instance_id: str
    instance_type: str
    start: dt.datetime
    started_how: str  # launched | restored
    end: Optional[dt.datetime] = None
    how: str = ""  # completed | failed | interrupted | lost | running
    last_event: Optional[dt.datetime] = None
    captured: Optional[dt.datetime] = None  # state of the last committed checkpoint
    checkpoints: int = 0
    spot_cost: Optional[float] = None
    ondemand_cost: Optional[float] = None

    @property
    def seconds(self) -> float:
        return max(0.0, ((self.end or self.start) - self.start).total_seconds())

    @property
    def lost_seconds(self) -> float:
        if self.how not in ("interrupted", "lost") or self.end is None:
            return 0.0
        since = max(self.captured or self.start, self.start)
        return max(0.0, (self.end - since).total_seconds())

    def to_json(self) -> Dict[str, Any]:
        return {"step": self.step, "node": self.node, "instance_id": self.instance_id,
                "instance_type": self.instance_type, "start": _iso(self.start), "end": _iso(self.end),
                "started": self.started_how, "ended": self.how, "seconds": round(self.seconds, 3),
                "work_lost_seconds": round(self.lost_seconds, 3), "checkpoints": self.checkpoints,
                "spot_cost": _money(self.spot_cost), "ondemand_cost": _money(self.ondemand_cost)}


@dataclass
class StepReport:
    step: str
    segments: List[Segment] = field(default_factory=list)
    checkpoints: int = 0
    checkpoints_failed: int = 0
    checkpoint_seconds: float = 0.0
    frozen_seconds: float = 0.0
    bytes_written: int = 0
    restores: int = 0
    restore_seconds: float = 0.0
    status: str = ""  # the last segment's end
    mode: str = "explicit"  # runner.MODES: `ckpt run` in the job script, or the whole script (transparent mode)
    # notices on which the final checkpoint was predicted not to fit and the job resumed from a recent periodic one
    finals_skipped: List[Dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        compute = sum(s.seconds for s in self.segments)
        lost = sum(s.lost_seconds for s in self.segments)
        return {"step": self.step, "mode": self.mode, "status": self.status,
                "segments": [s.to_json() for s in self.segments],
                "checkpoints": self.checkpoints, "checkpoints_failed": self.checkpoints_failed,
                "checkpoint_seconds": round(self.checkpoint_seconds, 3),
                "frozen_seconds": round(self.frozen_seconds, 3), "bytes_written": self.bytes_written,
                "restores": self.restores, "restore_seconds": round(self.restore_seconds, 3),
                "finals_skipped": self.finals_skipped,
                "compute_seconds": round(compute, 3), "work_lost_seconds": round(lost, 3),
                "net_runtime_seconds": round(compute - lost, 3)}


@dataclass
class JobReport:
    job_id: str
    steps: List[StepReport]
    submitted: Optional[dt.datetime]
    submitted_from: str  # slurm | first-event
    finished: Optional[dt.datetime]
    interruptions: int
    requeues: int
    state: str = ""

    @property
    def mode(self) -> str:
        """transparent when the job_submit plugin ran the whole script under `ckpt run`, else explicit."""
        return "transparent" if any(st.mode == "transparent" for st in self.steps) else "explicit"

    def totals(self) -> Dict[str, Any]:
        segs = [s for st in self.steps for s in st.segments]
        compute = sum(s.seconds for s in segs)
        lost = sum(s.lost_seconds for s in segs)
        spot = _sum(s.spot_cost for s in segs)
        od = _sum(s.ondemand_cost for s in segs)
        end = self.finished
        wall = (end - self.submitted).total_seconds() if end and self.submitted else None
        return {"compute_seconds": compute, "work_lost_seconds": lost, "net_runtime_seconds": compute - lost,
                "wall_clock_seconds": wall, "spot_cost": spot, "ondemand_cost": od,
                "savings": None if spot is None or od is None else od - spot,
                "checkpoints": sum(st.checkpoints for st in self.steps),
                "bytes_written": sum(st.bytes_written for st in self.steps),
                "restores": sum(st.restores for st in self.steps), "segments": len(segs),
                "finals_skipped": sum(len(st.finals_skipped) for st in self.steps),
                "unpriced_types": sorted({s.instance_type or "?" for s in segs if s.spot_cost is None})}

    def to_json(self) -> Dict[str, Any]:
        t = self.totals()
        for k in ("spot_cost", "ondemand_cost", "savings"):
            t[k] = _money(t[k])
        for k in ("compute_seconds", "work_lost_seconds", "net_runtime_seconds", "wall_clock_seconds"):
            t[k] = None if t[k] is None else round(t[k], 3)
        return {"job_id": self.job_id, "state": self.state, "submitted": _iso(self.submitted),
                "submitted_from": self.submitted_from, "finished": _iso(self.finished),
                "interruptions": self.interruptions, "requeues": self.requeues, "mode": self.mode, **t,
                "steps": [s.to_json() for s in self.steps]}


def _money(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 4)


def _sum(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return float(sum(vals))  # type: ignore[arg-type]


# --- reading the events ------------------------------------------------------------------------------------------
def load_job_events(store: CheckpointStore, job_id: Optional[str] = None) -> Dict[str, List[Dict[str, Any]]]:
    """{job id: events} from the job directories and gc's history (a job directory wins over its history)."""
    out: Dict[str, List[Dict[str, Any]]] = {}
    hist = os.path.join(store.root, HISTORY_DIR)
    names = []
    try:
        if stat.S_ISDIR(os.lstat(hist).st_mode):  # gc's directory, never a planted link
            names = sorted(n[:-6] for n in os.listdir(hist) if n.endswith(".jsonl") and not n.startswith("."))
    except OSError:
        pass
    for name in names:
        if job_id in (None, name):
            out[name] = _read_lines(os.path.join(hist, f"{name}.jsonl"))
    for name in store.jobs():
        if job_id in (None, name) and _regular(os.path.join(store.root, name, EVENTS)):
            out[name] = store.events(name)
    return out


def _regular(path: str) -> bool:
    """A regular file, not a link (to a file the user may not read) nor a FIFO (that would block the report)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_lines(path: str) -> List[Dict[str, Any]]:
    events: List[Dict[str, Any]] = []
    if not _regular(path):
        return events
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if isinstance(ev, dict):
                    events.append(ev)
    except OSError:
        pass
    return events


# --- computing -------------------------------------------------------------------------------------------------
def build_job(job_id: str, events: List[Dict[str, Any]], now: dt.datetime, prices: Dict[str, Dict[str, float]],
              submitted: Optional[dt.datetime] = None, state: str = "") -> JobReport:
    evs = sorted((e for e in events if parse_time(e.get("time"))), key=lambda e: parse_time(e["time"]))
    live = state not in ("", UNKNOWN) and state not in FINAL_STATES
    steps: Dict[str, StepReport] = {}
    open_seg: Dict[str, Segment] = {}
    interruptions = requeues = 0
    for e in evs:
        t = parse_time(e["time"])
        kind = e.get("event")
        if kind == ev.NOTICE_RECEIVED:
            interruptions += 1
        elif kind == ev.REQUEUED:
            requeues += 1
        if kind in JOB_EVENTS or not e.get("step"):
            for seg in open_seg.values():
                if seg.node == e.get("node"):
                    seg.last_event = t
            continue
        step = steps.setdefault(e["step"], StepReport(e["step"]))
        seg = open_seg.get(step.step)
        if seg is not None and kind in (ev.RESTORED, ev.SEGMENT_STARTED):  # a new run: the open one was lost
            _close(seg, "lost", seg.last_event or seg.start)
            del open_seg[step.step]
            seg = None
        if seg is not None:
            seg.last_event = t
        if kind == ev.SEGMENT_STARTED:
            step.mode = e.get("mode") or step.mode
            seg = open_seg[step.step] = Segment(step.step, e.get("node", ""), e.get("instance_id", ""),
                                                e.get("instance_type", ""), t, e.get("how", "launched"),
                                                last_event=t)
            step.segments.append(seg)
        elif kind == ev.SEGMENT_ENDED and seg is not None:
            _close(seg, e.get("how", "failed"), t)
            del open_seg[step.step]
        elif kind == ev.CHECKPOINT_COMMITTED:
            step.checkpoints += 1
            step.checkpoint_seconds += float(e.get("seconds") or 0)
            step.frozen_seconds += float(e.get("frozen_seconds") or 0)
            step.bytes_written += int(e.get("bytes_written") or 0)
            if seg is not None:
                seg.checkpoints += 1
                # a periodic checkpoint holds the state of its start; after a final one the tool ran no more
                took = 0.0 if e.get("final") else float(e.get("seconds") or 0)
                seg.captured = t - dt.timedelta(seconds=took)
        elif kind == ev.CHECKPOINT_FAILED:
            step.checkpoints_failed += 1
        elif kind == ev.FINAL_SKIPPED:
            step.finals_skipped.append({k: e.get(k) for k in ("time", "generation", "predicted_seconds",
                                                               "time_left_seconds", "periodic_age_seconds")})
        elif kind == ev.RESTORED:
            step.restores += 1
            step.restore_seconds += float(e.get("seconds") or 0)
    for seg in open_seg.values():
        if live:
            _close(seg, "running", now)
        else:
            _close(seg, "lost", seg.last_event or seg.start)
    for st in steps.values():
        st.status = st.segments[-1].how if st.segments else ""
        for seg in st.segments:
            _price(seg, prices)
    ends = [s.end for st in steps.values() for s in st.segments if s.end]
    first = parse_time(evs[0]["time"]) if evs else None
    # Slurm moves SubmitTime to the requeue on every requeue: it counts only when it is older than our first event
    use_slurm = submitted is not None and (first is None or submitted <= first)
    return JobReport(job_id, [steps[k] for k in sorted(steps)], submitted if use_slurm else first,
                     "slurm" if use_slurm else "first-event", max(ends) if ends else None, interruptions, requeues,
                     state)


def _close(seg: Segment, how: str, end: dt.datetime) -> None:
    seg.how = how
    seg.end = max(end, seg.start)


def _price(seg: Segment, prices: Dict[str, Dict[str, float]]) -> None:
    p = prices.get(seg.instance_type) or {}
    if "spot" in p:
        seg.spot_cost = seg.seconds / 3600.0 * float(p["spot"])
    if "ondemand" in p:  # on demand there is no interruption: only the work that counted is paid for
        seg.ondemand_cost = (seg.seconds - seg.lost_seconds) / 3600.0 * float(p["ondemand"])


def summarize(jobs: List[JobReport]) -> Dict[str, Any]:
    totals = [j.totals() for j in jobs]

    def add(key: str) -> float:
        return float(sum(t[key] or 0 for t in totals))

    priced = [t for t in totals if t["savings"] is not None]
    spot = sum(t["spot_cost"] for t in priced)
    od = sum(t["ondemand_cost"] for t in priced)
    starts = [j.submitted for j in jobs if j.submitted]
    ends = [j.finished for j in jobs if j.finished]
    return {"jobs": len(jobs), "jobs_priced": len(priced), "from": _iso(min(starts)) if starts else None,
            "to": _iso(max(ends)) if ends else None, "segments": int(add("segments")),
            "interruptions": sum(j.interruptions for j in jobs), "requeues": sum(j.requeues for j in jobs),
            "checkpoints": int(add("checkpoints")), "bytes_written": int(add("bytes_written")),
            "restores": int(add("restores")), "finals_skipped": int(add("finals_skipped")),
            "compute_hours": round(add("compute_seconds") / 3600, 4),
            "work_lost_hours": round(add("work_lost_seconds") / 3600, 4),
            "net_runtime_hours": round(add("net_runtime_seconds") / 3600, 4),
            "wall_clock_hours": round(add("wall_clock_seconds") / 3600, 4),
            "spot_cost": round(spot, 4), "ondemand_cost": round(od, 4), "savings": round(od - spot, 4),
            "savings_percent": round(100.0 * (od - spot) / od, 1) if od else None}


def build_report(events: Dict[str, List[Dict[str, Any]]], prices: Dict[str, Dict[str, float]],
                 since: Optional[dt.datetime] = None, now: Optional[dt.datetime] = None,
                 slurm_facts: Optional[Callable[[str], Dict[str, Any]]] = None) -> Dict[str, Any]:
    """The whole report as a JSON-able dict: {"jobs": [...], "summary": {...}}. `slurm_facts(job_id)` returns
    {"submitted": datetime, "state": str} or {} (Slurm optional)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    jobs = []
    for job_id in sorted(events, key=_job_sort_key):
        evs = events[job_id]
        times = [parse_time(e.get("time")) for e in evs]
        times = [t for t in times if t]
        if not times or (since and max(times) < since):
            continue
        facts = slurm_facts(job_id) if slurm_facts else {}
        jobs.append(build_job(job_id, evs, now, prices, facts.get("submitted"), facts.get("state", "")))
    return {"generated": _iso(now), "since": _iso(since), "jobs": [j.to_json() for j in jobs],
            "summary": summarize(jobs)}


def _job_sort_key(job_id: str):
    head = job_id.split("_")[0]
    return (0, int(head), job_id) if head.isdigit() else (1, 0, job_id)


# --- presenting --------------------------------------------------------------------------------------------------
def hours(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def usd(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"${v:,.2f}" if abs(v) >= 1 or v == 0 else f"${v:.4f}"  # short jobs cost fractions of a cent


def _secs(v: Any) -> str:
    return "?" if v is None else f"{float(v):.0f}"


def render_text(report: Dict[str, Any]) -> str:
    lines = []
    for job in report["jobs"]:
        lines.append(f"job {job['job_id']}{' (' + job['state'] + ')' if job['state'] else ''}: submitted "
                     f"{job['submitted'] or '-'} ({job['submitted_from']}), finished {job['finished'] or '-'}; "
                     f"{job['interruptions']} interruption(s), {job['requeues']} requeue(s)"
                     + (f", {job['finals_skipped']} final checkpoint(s) SKIPPED" if job["finals_skipped"] else ""))
        lines.append("  mode: " + ("transparent (the job_submit plugin ran the whole batch script under ckpt run)"
                                   if job["mode"] == "transparent" else "explicit (ckpt run in the job script)"))
        if any(step["segments"] for step in job["steps"]):
            lines.append(f"  {'STEP':<8} {'NODE':<10} {'INSTANCE':<20} {'TYPE':<12} {'START':<20} {'END':<20} "
                         f"{'ENDED':<11} {'RUN':>9} {'LOST':>8} {'CKPTS':>5} {'SPOT':>9} {'ON-DEMAND':>10}")
        for step in job["steps"]:
            for s in step["segments"]:
                lines.append(f"  {s['step']:<8} {s['node'][:10]:<10} {(s['instance_id'] or '-')[:20]:<20} "
                             f"{(s['instance_type'] or '-')[:12]:<12} {s['start'] or '-':<20} {s['end'] or '-':<20} "
                             f"{s['ended']:<11} {hours(s['seconds']):>9} {hours(s['work_lost_seconds']):>8} "
                             f"{s['checkpoints']:>5} {usd(s['spot_cost']):>9} {usd(s['ondemand_cost']):>10}")
            lines.append(f"  {step['step']}: {step['checkpoints']} checkpoint(s) "
                         f"({step['checkpoint_seconds']:.1f} s, {step['frozen_seconds']:.1f} s frozen, "
                         f"{human_bytes(step['bytes_written'])} written), {step['checkpoints_failed']} failed, "
                         f"{step['restores']} restore(s) ({step['restore_seconds']:.1f} s)")
            for f in step["finals_skipped"]:
                lines.append(f"  {step['step']}: final checkpoint skipped at {f['time']}: predicted "
                             f"{_secs(f['predicted_seconds'])} s, {_secs(f['time_left_seconds'])} s left; "
                             f"resumed from checkpoint {f['generation']}, {_secs(f['periodic_age_seconds'])} s old")
        lines.append(f"  net runtime {hours(job['net_runtime_seconds'])} vs wall clock "
                     f"{hours(job['wall_clock_seconds'])}; work lost {hours(job['work_lost_seconds'])}; "
                     f"Spot {usd(job['spot_cost'])} vs On-Demand {usd(job['ondemand_cost'])}: saved "
                     f"{usd(job['savings'])}"
                     + (f" (no price for {', '.join(job['unpriced_types'])})" if job["unpriced_types"] else ""))
        lines.append("")
    s = report["summary"]
    lines.append(f"summary {s['from'] or '-'} .. {s['to'] or '-'}: {s['jobs']} job(s), {s['segments']} segment(s), "
                 f"{s['interruptions']} interruption(s), {s['checkpoints']} checkpoint(s) "
                 f"({human_bytes(s['bytes_written'])}), {s['restores']} restore(s)"
                 + (f", {s['finals_skipped']} final checkpoint(s) skipped" if s["finals_skipped"] else ""))
    lines.append(f"  compute {s['compute_hours']:.2f} h, work lost {s['work_lost_hours']:.2f} h, net runtime "
                 f"{s['net_runtime_hours']:.2f} h, wall clock {s['wall_clock_hours']:.2f} h")
    pct = f" ({s['savings_percent']:.1f}%)" if s["savings_percent"] is not None else ""
    lines.append(f"  Spot {usd(s['spot_cost'])} vs On-Demand {usd(s['ondemand_cost'])}: saved {usd(s['savings'])}"
                 f"{pct} over {s['jobs_priced']} priced job(s)")
    return "\n".join(lines)


# --- CloudWatch --------------------------------------------------------------------------------------------------
METRICS = (  # summary key, metric name, unit
    ("jobs", "Jobs", "Count"), ("interruptions", "Interruptions", "Count"), ("checkpoints", "Checkpoints", "Count"),
    ("restores", "Restores", "Count"), ("bytes_written", "CheckpointBytesWritten", "Bytes"),
    ("compute_hours", "ComputeHours", "None"), ("work_lost_hours", "WorkLostHours", "None"),
    ("net_runtime_hours", "NetRuntimeHours", "None"), ("wall_clock_hours", "WallClockHours", "None"),
    ("spot_cost", "SpotCostUSD", "None"), ("ondemand_cost", "OnDemandCostUSD", "None"),
    ("savings", "SavingsUSD", "None"),
)


def metric_data(report: Dict[str, Any], cluster: str) -> List[Dict[str, Any]]:
    s = report["summary"]
    when = parse_time(report["generated"])
    dims = [{"Name": "ClusterName", "Value": cluster or "default"}]  # the dimension metrics.py uses too
    return [{"MetricName": name, "Dimensions": dims, "Timestamp": when, "Value": float(s[key] or 0), "Unit": unit}
            for key, name, unit in METRICS]


def put_metrics(client, namespace: str, report: Dict[str, Any], cluster: str) -> int:
    """Send the summary to CloudWatch (20 metrics per call, the API's limit for PutMetricData batches)."""
    from ckpt_agent.adapters.aws import aws_call, region_of

    data = metric_data(report, cluster)
    with aws_call("CloudWatch", "PutMetricData", region=region_of(client), subject=f"namespace {namespace}"):
        for i in range(0, len(data), 20):
            client.put_metric_data(Namespace=namespace, MetricData=data[i:i + 20])
    return len(data)
