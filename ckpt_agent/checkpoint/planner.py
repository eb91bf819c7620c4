"""Will a final checkpoint fit inside the Spot notice? A sizing model for admins (`ckpt plan`, `ckpt validate`).

A final checkpoint has the 2-minute notice less the agent's margin for unmounting FSx (`deadline_margin`) and one
IMDS poll. When a share of a queue's nodes is reclaimed at once, all of them write to the same FSx file system at
the same time, so each node gets at most its share of the file system's throughput, and never more than its own
network link. The model, per queue:

    nodes_at_once   = ceil(max_count * reclaimed_share)
    bytes           = job_memory * changed_share / compression_ratio      (what the final checkpoint writes)
    node_bandwidth  = min(fsx_throughput / nodes_at_once, node_network, measured_store_bandwidth)
    dump            = job_memory / dump_rate                               (every page read)
                    = job_memory / scan_rate + job_memory * changed_share / dump_rate
                                                  (an incremental final with dirty tracking: only written pages read)
    predicted       = dump + bytes / node_bandwidth                        (dump, then the write; final_seconds)
    fits            = predicted <= budget

The second form of the dump holds for an incremental final (changed_share < 1) of a queue whose
`checkpoint.dirty_tracking` is on and `checkpoint.stream` is not off: CRIU then walks the job's page tables and
sends only the pages written since the periodic checkpoint (userfaultfd or soft-dirty tracking, engine.py), where
otherwise it reads every page. Its default scan rate is on the safe side of what the 12 GiB bench measured
(bench/big_job_bench.py: the final after a 5% change froze the tool 1.9-2.6 s, about 5-7 GiB/s of memory on 2 vCPUs).

FSx for Lustre's throughput is its capacity in TiB times its per-TiB throughput (SCRATCH_1 and SCRATCH_2: 200
MB/s/TiB, AWS documentation). Instance memory and baseline network bandwidth come from a small table of common
EDA instance types (EC2 documentation); others need --job-memory and, to bound the link, --node-network.
Measured figures (the store bandwidth one node saw, CRIU's dump and scan rates, whether it could track written
pages) replace the published ones when given: one by one on the command line, or all at once from the record
`bench/checkpoint_bench.py --plan-inputs FILE` writes on a node (`measured_record`, read by `load_measured`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from ckpt_agent.errors import ConfigError, UsageError

NOTICE_SECONDS = 120
MB = 1000 * 1000
GIB = 1 << 30
TIB = 1 << 40
SCRATCH_MB_S_PER_TIB = 200
DEFAULT_DUMP_GIB_S = 2.0  # CRIU's dump into page pipes and a tmpfs stage, per node (bench/checkpoint_bench.py)
DEFAULT_SCAN_GIB_S = 4.0  # memory a dump with dirty tracking walks per second for the written pages (see above)

# instance type -> (memory GiB, baseline network Gbit/s)
INSTANCE_FACTS: Dict[str, tuple] = {
    "r5.2xlarge": (64, 2.5), "r5.4xlarge": (128, 5.0), "r5.8xlarge": (256, 10.0), "r5.12xlarge": (384, 10.0),
    "r6i.2xlarge": (64, 3.125), "r6i.4xlarge": (128, 6.25), "r6i.8xlarge": (256, 12.5),
    "r6i.12xlarge": (384, 18.75), "r6i.16xlarge": (512, 25.0), "r6i.32xlarge": (1024, 50.0),
    "r6a.2xlarge": (64, 3.125), "r6a.4xlarge": (128, 6.25), "r6a.8xlarge": (256, 12.5),
    "r6a.16xlarge": (512, 25.0), "r7i.4xlarge": (128, 6.25), "r7i.8xlarge": (256, 12.5),
    "r7iz.4xlarge": (128, 6.25), "r7iz.8xlarge": (256, 12.5), "x2idn.16xlarge": (1024, 50.0),
    "m6i.2xlarge": (32, 3.125), "m6i.4xlarge": (64, 6.25), "m6i.xlarge": (16, 1.562),
    "c6i.large": (4, 0.781), "c6i.4xlarge": (32, 6.25), "r6i.large": (16, 0.781),
}


@dataclass
class Inputs:
    job_memory_gib: Optional[float] = None  # default: 90% of the queue's smallest instance memory
    reclaimed_share: float = 0.25
    changed_share: float = 1.0  # share of the job's memory a final checkpoint writes (1.0: a full checkpoint)
    compression_ratio: float = 1.0
    store_mb_s: Optional[float] = None  # measured store write bandwidth of one node
    dump_gib_s: float = DEFAULT_DUMP_GIB_S
    scan_gib_s: float = DEFAULT_SCAN_GIB_S
    node_network_gbit: Optional[float] = None
    fsx_mb_s: Optional[float] = None  # needed for an existing file system
    dirty_tracking: bool = True  # False: the nodes cannot track written pages (a measured record said so)


@dataclass
class QueuePlan:
    queue: str
    instance_type: str
    job_memory_gib: float
    nodes_at_once: int
    write_gib: float
    dirty_tracking: bool  # an incremental final that reads only the written pages (see the model)
    dump_seconds: float
    node_mb_s: float
    limited_by: str
    predicted_seconds: float
    budget_seconds: float
    fits: bool
    fsx_mb_s: float
    fsx_mb_s_needed: Optional[float]  # the file system throughput that would make it fit (None: the link limits)
    max_write_gib: float  # what one node can write in time with this file system and link

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


MEASURED_FORMAT = 1
MEASURED_RATES = ("store_mb_s", "dump_gib_s", "scan_gib_s")  # each optional in a record; > 0 where present
MEASURED_MAX_BYTES = 64 * 1024


def measured_record(*, where: str, when: str, store_mb_s: float, dump_gib_s: Optional[float],
                    scan_gib_s: Optional[float], dirty_tracking: bool) -> Dict[str, Any]:
    """What one node measured, for `ckpt plan --measured` (bench/checkpoint_bench.py --plan-inputs writes it).
    scan_gib_s: None where no dump sent only the written pages (then dirty_tracking is False)."""
    record: Dict[str, Any] = {"format": MEASURED_FORMAT, "where": where, "when": when,
                              "store_mb_s": round(store_mb_s, 1), "dirty_tracking": bool(dirty_tracking)}
    if dump_gib_s:
        record["dump_gib_s"] = round(dump_gib_s, 2)
    if scan_gib_s:
        record["scan_gib_s"] = round(scan_gib_s, 2)
    return record


def load_measured(path: str) -> Dict[str, Any]:
    """A measured record, checked: ConfigError naming the file and what is wrong with it."""
    from ckpt_agent.util.safeio import NotRegularFile, read_regular  # noqa: PLC0415 - only with --measured

    try:
        record = json.loads(read_regular(path, MEASURED_MAX_BYTES, follow=True))
    except (OSError, NotRegularFile) as e:
        raise ConfigError(f"{path}: cannot read the measured figures: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested deeper than the parser goes
        raise ConfigError(f"{path}: not a measured record (bench/checkpoint_bench.py --plan-inputs): {e}") from None
    if not isinstance(record, dict) or record.get("format") != MEASURED_FORMAT:
        raise ConfigError(f"{path}: not a measured record of format {MEASURED_FORMAT} "
                          "(bench/checkpoint_bench.py --plan-inputs writes one)")
    for key in MEASURED_RATES:
        value = record.get(key)
        if value is None and key != "store_mb_s":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{path}: {key}: must be a number > 0, got {value!r}")
    for key in ("where", "when"):  # printed by `ckpt plan`: plain text only
        value = record.get(key)
        if not isinstance(value, str) or len(value) > 200 or not value.isprintable():
            raise ConfigError(f"{path}: {key}: must be a line of plain text, got {value!r:.80}")
    if not isinstance(record.get("dirty_tracking"), bool):
        raise ConfigError(f"{path}: dirty_tracking: must be true or false, got {record.get('dirty_tracking')!r}")
    return record


def measured_inputs(measured: Dict[str, Any], *, store_mb_s: Optional[float] = None,
                    dump_gib_s: Optional[float] = None, scan_gib_s: Optional[float] = None, **rest: Any) -> Inputs:
    """Inputs with a node's measured figures (a load_measured record; {} for none), each one given explicitly
    overriding the record's; the rest of Inputs as given."""
    return Inputs(store_mb_s=store_mb_s or measured.get("store_mb_s"),
                  dump_gib_s=dump_gib_s or measured.get("dump_gib_s") or DEFAULT_DUMP_GIB_S,
                  scan_gib_s=scan_gib_s or measured.get("scan_gib_s") or DEFAULT_SCAN_GIB_S,
                  dirty_tracking=measured.get("dirty_tracking", True), **rest)


def fsx_throughput_mb_s(site: Dict[str, Any]) -> Optional[float]:
    new = site["storage"].get("new")
    if not new:
        return None
    per_tib = new.get("throughput_mb_s_per_tib") or SCRATCH_MB_S_PER_TIB
    return new["storage_capacity_gib"] / 1024 * per_tib


def budget_seconds(checkpoint: Dict[str, Any]) -> float:
    return NOTICE_SECONDS - checkpoint.get("deadline_margin", 20) - checkpoint.get("poll_interval", 2)


MIN_INTERVAL_SECONDS = 60.0  # the wrapper never shortens the periodic interval below this (nor below the configured)


@dataclass
class IntervalPlan:
    """The wrapper's deadline plan after one periodic checkpoint (an `interval_planned` event when it changes)."""

    predicted_final_seconds: float  # a final checkpoint taken just before the next periodic one, at this interval
    budget_seconds: float
    interval_seconds: float  # the periodic interval to use from now on
    changed_bytes_per_second: float  # new data the job produced between the last two checkpoints
    store_bytes_per_second: float  # the store's write bandwidth that checkpoint saw

    def to_json(self) -> Dict[str, Any]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def plan_interval(*, interval: float, budget: float, frozen_seconds: float, bytes_written: int,
                  write_seconds: float, seconds_since_previous: float) -> Optional[IntervalPlan]:
    """Predict a final checkpoint from the last periodic one, and the interval that makes it fit the budget.

    A final checkpoint costs what the tool was frozen for (the dump and the file capture, which scale with its
    memory, not with what changed) plus writing what changed since the previous checkpoint. That grows with the
    time since it: at worst, just before the next periodic checkpoint,
        predicted = frozen + (changed_rate * interval) / store_bandwidth
    with changed_rate = bytes written / seconds since the previous checkpoint, store_bandwidth = bytes written /
    seconds spent writing them. When that exceeds the budget, the interval is shortened until it fits (not below
    MIN_INTERVAL_SECONDS; when the dump alone does not fit, to that minimum). None without enough to go on.
    """
    if bytes_written <= 0 or write_seconds <= 0 or seconds_since_previous <= 0 or interval <= 0:
        return None
    rate = bytes_written / seconds_since_previous
    bandwidth = bytes_written / write_seconds
    predicted = frozen_seconds + rate * interval / bandwidth
    chosen = interval
    if predicted > budget:
        floor = min(interval, MIN_INTERVAL_SECONDS)
        fitting = (budget - frozen_seconds) * bandwidth / rate if budget > frozen_seconds else 0.0
        chosen = max(floor, min(interval, fitting))
    return IntervalPlan(predicted_final_seconds=predicted, budget_seconds=budget, interval_seconds=chosen,
                        changed_bytes_per_second=rate, store_bytes_per_second=bandwidth)


@dataclass
class FinalDecision:
    """On a notice: take the final checkpoint, or skip it and requeue from the newest periodic one."""

    skip: bool
    predicted_seconds: Optional[float]  # None: nothing to predict from yet (fewer than two periodic checkpoints)
    time_left_seconds: float  # until the deadline (the notice's time less the unmount margin)
    periodic_age_seconds: Optional[float]  # since the newest periodic checkpoint committed (None: none yet)
    recent_seconds: float  # a periodic checkpoint younger than this is recent enough to resume from

    def to_json(self) -> Dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "skip"}


def decide_final(*, frozen_seconds: Optional[float], changed_bytes_per_second: Optional[float],
                 store_bytes_per_second: Optional[float], periodic_age_seconds: Optional[float],
                 time_left_seconds: float, recent_seconds: float) -> FinalDecision:
    """Skip a final checkpoint that would be cut off, when a recent periodic one can stand in for it.

    The final writes what changed since the newest periodic checkpoint, after freezing the tool for the dump:
        predicted = frozen + changed_rate * age / store_bandwidth
    (the model of plan_interval, at the periodic checkpoint's actual age). Skip only when the prediction exceeds the
    time left AND that checkpoint is younger than recent_seconds; otherwise try the final (best effort: a final
    that fails leaves the periodic one in place). No prediction without the stats of two periodic checkpoints."""
    predicted = None
    if (frozen_seconds is not None and changed_bytes_per_second is not None and store_bytes_per_second
            and periodic_age_seconds is not None):
        predicted = frozen_seconds + changed_bytes_per_second * periodic_age_seconds / store_bytes_per_second
    skip = (predicted is not None and predicted > time_left_seconds
            and periodic_age_seconds is not None and periodic_age_seconds <= recent_seconds)
    return FinalDecision(skip=skip, predicted_seconds=predicted, time_left_seconds=time_left_seconds,
                         periodic_age_seconds=periodic_age_seconds, recent_seconds=recent_seconds)


def plan_site(site: Dict[str, Any], inputs: Inputs) -> List[QueuePlan]:
    if not 0 < inputs.reclaimed_share <= 1:
        raise UsageError("the share of nodes reclaimed at once must be in (0, 1]")
    if (not 0 < inputs.changed_share <= 1 or inputs.compression_ratio < 1 or inputs.dump_gib_s <= 0
            or inputs.scan_gib_s <= 0):
        raise UsageError("--changed must be in (0, 1], --compression >= 1, --dump-gib-s and --scan-gib-s > 0")
    fsx = inputs.fsx_mb_s or fsx_throughput_mb_s(site)
    if fsx is None:
        raise UsageError("the site uses an existing file system: give its throughput with --fsx-mb-s")
    plans = []
    for q in site["queues"]:
        if not q["checkpoint"]["enabled"]:
            continue
        plans.append(_plan_queue(q, fsx, inputs))
    return plans


def final_seconds(*, memory_bytes: float, changed_bytes: float, write_bytes: float, bandwidth: float,
                  tracked: bool, dump_gib_s: float, scan_gib_s: float) -> Tuple[float, float]:
    """The model's (dump, predicted) seconds for one final checkpoint (the module's docstring): a job holding
    `memory_bytes`, of which `changed_bytes` were written since the periodic checkpoint (all of it for a full one),
    storing `write_bytes` at `bandwidth` bytes/s; `tracked`: CRIU walks the page tables and reads only the written
    pages. The dump and the write are added, though a streamed final overlaps them: where the store is the
    bottleneck (a node's share of FSx) that errs long. Where the node's cores are (2 vCPUs against a fast local
    disk), the checkpoint's hashing and copying slow its writes below dd's bandwidth and, given dd's, it errs short:
    bench/big_job_bench.py prints the model's figure next to the measured one (2026-12-05, 12 GiB: full predicted
    21.4 s, measured 27.2 s; final 4.2 s against 3.1 s), and bench/checkpoint_bench.py --plan-inputs records the
    bandwidth the checkpoints achieved where it is below dd's."""
    if tracked:
        dump = memory_bytes / (scan_gib_s * GIB) + changed_bytes / (dump_gib_s * GIB)
    else:
        dump = memory_bytes / (dump_gib_s * GIB)
    return dump, dump + write_bytes / bandwidth


def _plan_queue(q: Dict[str, Any], fsx: float, inputs: Inputs) -> QueuePlan:
    known = [(t, INSTANCE_FACTS[t]) for t in q["instance_types"] if t in INSTANCE_FACTS]
    itype, (mem, net) = min(known, key=lambda kv: kv[1][0]) if known else (q["instance_types"][0], (None, None))
    job_gib = inputs.job_memory_gib or (mem * 0.9 if mem else None)
    if job_gib is None:
        raise UsageError(f"queue {q['name']}: memory of {', '.join(q['instance_types'])} unknown: give --job-memory")
    net_gbit = inputs.node_network_gbit or net
    nodes = max(1, math.ceil(q["max_count"] * inputs.reclaimed_share))
    write_bytes = job_gib * GIB * inputs.changed_share / inputs.compression_ratio
    limits = {"FSx share": fsx * MB / nodes}
    if net_gbit:
        limits["node network"] = net_gbit * 1e9 / 8
    if inputs.store_mb_s:
        limits["measured store bandwidth"] = inputs.store_mb_s * MB
    limited_by, bw = min(limits.items(), key=lambda kv: kv[1])
    settings = q["checkpoint"]
    tracked = (inputs.changed_share < 1 and inputs.dirty_tracking and settings.get("dirty_tracking", True)
               and settings.get("stream", "auto") != "off")
    dump, predicted = final_seconds(memory_bytes=job_gib * GIB, changed_bytes=job_gib * GIB * inputs.changed_share,
                                    write_bytes=write_bytes, bandwidth=bw, tracked=tracked,
                                    dump_gib_s=inputs.dump_gib_s, scan_gib_s=inputs.scan_gib_s)
    budget = budget_seconds(q["checkpoint"])
    needed: Optional[float] = None
    left = budget - dump
    if predicted > budget:
        if left > 0:
            per_node = write_bytes / left
            others = [v for k, v in limits.items() if k != "FSx share"]
            if not others or min(others) >= per_node:
                needed = per_node * nodes / MB
    return QueuePlan(queue=q["name"], instance_type=itype, job_memory_gib=round(job_gib, 1), nodes_at_once=nodes,
                     write_gib=round(write_bytes / GIB, 1), dirty_tracking=tracked, dump_seconds=round(dump, 1),
                     node_mb_s=round(bw / MB, 1), limited_by=limited_by,
                     predicted_seconds=round(predicted, 1), budget_seconds=budget, fits=predicted <= budget,
                     fsx_mb_s=round(fsx, 1), fsx_mb_s_needed=round(needed, 1) if needed else None,
                     max_write_gib=round(max(0.0, left) * bw / GIB, 1))


def advice(p: QueuePlan, site: Dict[str, Any]) -> str:
    """One line: fits, or what would make it fit."""
    if p.fits:
        return f"fits: {p.predicted_seconds:g} s of {p.budget_seconds:g} s"
    line = f"does NOT fit: {p.predicted_seconds:g} s of {p.budget_seconds:g} s, limited by {p.limited_by}"
    if p.fsx_mb_s_needed:
        line += f"; needs FSx throughput >= {p.fsx_mb_s_needed:,.0f} MB/s (has {p.fsx_mb_s:,.0f})"
        new = site["storage"].get("new") or {}
        per_tib = new.get("throughput_mb_s_per_tib") or (SCRATCH_MB_S_PER_TIB if new else None)
        if per_tib:
            line += f", e.g. {math.ceil(p.fsx_mb_s_needed / per_tib * 1024):,} GiB at {per_tib} MB/s/TiB"
    elif p.max_write_gib > 0:
        line += (f"; a node can write at most {p.max_write_gib:g} GiB in time: keep what changes between periodic "
                 "checkpoints below that (a shorter interval), or use instances with a faster link")
    else:
        line += (f"; the dump alone ({p.dump_seconds:g} s, "
                 + ("its memory walked for the written pages" if p.dirty_tracking else "every page read")
                 + ") takes longer than the notice allows")
    return line
