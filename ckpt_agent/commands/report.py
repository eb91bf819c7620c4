"""`ckpt report [--job-id ID] [--since DATE] [--json] [--html FILE] [--cloudwatch NAMESPACE]`: per job and
step, the run segments, checkpoints, restores, work lost, net runtime against wall-clock time, and what Spot cost
against On-Demand.

Slurm is optional: when it answers, a job's submission time and state come from it; otherwise the first event
stands for the submission. `--html FILE` also writes the report as one self-contained page (report_html.py).
Exit codes: 0, 2 bad --since, 66 no such job, 74 --html FILE not writable, 78 configuration, 80 CloudWatch failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import socket
from typing import Any, Callable, Dict, Optional

from ckpt_agent.adapters.aws import aws_call
from ckpt_agent.adapters.aws_prices import effective_prices
from ckpt_agent.adapters.slurm import JobNotFound, Slurm
from ckpt_agent.commands._common import (
    add_config_args,
    load,
    name_arg,
    open_store,
)
from ckpt_agent.errors import (
    CkptError,
    NotFoundError,
    StoreError,
    UsageError,
)
from ckpt_agent.headnode.report import (
    build_report,
    load_job_events,
    put_metrics,
    render_text,
)
from ckpt_agent.headnode.report_html import render_html
from ckpt_agent.util.safeio import write_atomic

log = logging.getLogger(__name__)

HELP = "report run segments, checkpoints, work lost, net vs wall-clock runtime and Spot savings per job"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--job-id", metavar="ID", type=name_arg("job id"), help="only this job")
    parser.add_argument("--since", metavar="DATE",
                        help="jobs with events since DATE (2026-11-01, 2026-11-01T08:00:00Z, or 7d / 24h ago)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report (timeline, costs)")
    parser.add_argument("--no-slurm", action="store_true", help="do not ask Slurm for submission times and states")
    parser.add_argument("--cloudwatch", metavar="NAMESPACE", help="also put the summary as CloudWatch metrics")
    parser.add_argument("--region", metavar="R", help="AWS region for --cloudwatch (default: the AWS SDK's)")
    parser.add_argument("--cluster", metavar="NAME",
                        help="ClusterName dimension for --cloudwatch (default: config monitoring.cluster, else host)")


def parse_since(text: Optional[str], now: dt.datetime) -> Optional[dt.datetime]:
    if not text:
        return None
    m = re.fullmatch(r"(\d+)\s*([dh])", text.strip())
    if m:
        n = int(m.group(1))
        return now - (dt.timedelta(days=n) if m.group(2) == "d" else dt.timedelta(hours=n))
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a date (2026-11-01), a time (2026-11-01T08:00:00Z) "
                         "or an age (7d, 24h)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def slurm_facts(slurm: Slurm) -> Callable[[str], Dict[str, Any]]:
    """Submission time and state per job; after the first sign that Slurm cannot be asked, stop asking."""
    usable = [True]

    def facts(job_id: str) -> Dict[str, Any]:
        if not usable[0]:
            return {}
        try:
            info = slurm.job_info(job_id)
        except JobNotFound:
            return {}
        except CkptError as e:
            log.info("Slurm not available for submission times (%s); using the first events", e)
            usable[0] = False
            return {}
        return {"submitted": info.submit_time, "state": info.state}

    return facts


def main(args: argparse.Namespace) -> int:
    cfg = load(args)
    store = open_store(cfg, args)
    now = dt.datetime.now(dt.timezone.utc)
    since = parse_since(args.since, now)
    events = load_job_events(store, args.job_id)
    if args.job_id is not None and not events:
        raise NotFoundError(f"no events of job {args.job_id} in {store.root}")
    prices, _ = effective_prices(cfg.prices, cfg.prices_file)
    facts = None if args.no_slurm else slurm_facts(Slurm.from_config(cfg))
    report = build_report(events, prices, since=since, now=now, slurm_facts=facts)
    if args.html:
        _write_html(args.html, render_html(report, events))
    if args.cloudwatch:
        cluster = args.cluster or cfg.monitoring.cluster or cfg.cluster or socket.gethostname()
        put_metrics(_cloudwatch(args.region or cfg.monitoring.region or None), args.cloudwatch, report, cluster)
    print(json.dumps(report, indent=2) if args.json else render_text(report))
    return 0


def _write_html(path: str, text: str) -> None:
    try:
        write_atomic(os.path.abspath(path), text.encode(), mode=0o644, durable=False)
    except OSError as e:
        raise StoreError(f"--html {path}: cannot write: {e.strerror or e}") from e


def _cloudwatch(region: Optional[str]):
    import boto3

    with aws_call("CloudWatch", "client", region=region):
        return boto3.client("cloudwatch", region_name=region) if region else boto3.client("cloudwatch")
