"""`ckpt list`: the store's jobs, steps and generations with their times and sizes.

In a store shared by several users each job directory is private (0700): the listing shows what the caller may
read and says on stderr how many jobs it skipped. Each generation's facts come from its small summary file
(written at commit), so listing thousands of jobs never parses their manifests; `ckpt verify` checks integrity.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Tuple

from ckpt_agent.commands._common import (
    add_config_args,
    load,
    name_arg,
    open_store,
)
from ckpt_agent.errors import (
    DamagedCheckpointError,
    NotFoundError,
    PermissionDenied,
    StoreError,
)
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.util.units import human_bytes

HELP = "list the checkpoints in the store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--job-id", metavar="ID", type=name_arg("job id"), help="only this job")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect_job(store: CheckpointStore, job: str) -> List[Dict[str, Any]]:
    rows = []
    for step in store.steps(job):
        result = store.result(job, step)
        gens = []
        for gen in store.generations(job, step):
            try:
                m = store.load_summary(gen)
                gens.append({"generation": gen.number, "created": m.created, "final": m.final, "reason": m.reason,
                             "bytes": m.bytes_in, "bytes_written": m.bytes_written, "node": m.node})
            except (DamagedCheckpointError, PermissionDenied) as e:
                gens.append({"generation": gen.number, "damaged": str(e)})
        rows.append({"job_id": job, "step": step, "generations": gens,
                     "finished": result is not None, "exit_status": (result or {}).get("exit_status")})
    return rows


def collect(store: CheckpointStore, job_ids: List[str]) -> Tuple[List[Dict[str, Any]], int]:
    """(rows of the jobs the caller may read, number of jobs skipped because the caller may not read them)."""
    rows: List[Dict[str, Any]] = []
    skipped = 0
    for job in job_ids:
        try:
            rows.extend(collect_job(store, job))
        except (PermissionError, PermissionDenied):  # another user's 0700 job directory
            skipped += 1
        except StoreError as e:
            if isinstance(e.__cause__, PermissionError):
                skipped += 1
            else:
                raise
    return rows, skipped


def main(args: argparse.Namespace) -> int:
    store = open_store(load(args), args)
    if args.job_id is not None:
        try:
            steps = store.steps(args.job_id)
        except PermissionError:
            raise PermissionDenied(f"job {args.job_id} in {store.root} is not yours to read") from None
        if not steps:
            raise NotFoundError(f"no job {args.job_id} in {store.root}")
        jobs = [args.job_id]
    else:
        jobs = store.jobs()
    rows, skipped = collect(store, jobs)
    if skipped:
        print(f"ckpt: skipped {skipped} job(s) in {store.root} that you may not read", file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'JOB':<16} {'STEP':<10} {'GEN':>4}  {'CREATED':<24} {'KIND':<9} {'SIZE':>10} {'WRITTEN':>10}  NODE")
    for row in rows:
        if row["finished"] and not row["generations"]:
            print(f"{row['job_id']:<16} {row['step']:<10} {'-':>4}  finished, exit status {row['exit_status']}")
        for g in row["generations"]:
            if "damaged" in g:
                print(f"{row['job_id']:<16} {row['step']:<10} {g['generation']:>4}  DAMAGED: {g['damaged']}")
                continue
            kind = "final" if g["final"] else g["reason"]
            print(f"{row['job_id']:<16} {row['step']:<10} {g['generation']:>4}  {str(g['created']):<24} "
                  f"{str(kind):<9} {human_bytes(g['bytes']):>10} {human_bytes(g['bytes_written']):>10}  {g['node']}")
    return 0
