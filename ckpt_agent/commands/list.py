"""`ckpt list`: the store's jobs, steps and generations with their times and sizes."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List

from ..errors import DamagedCheckpointError, NotFoundError, PermissionDenied, StoreError
from ..store import CheckpointStore, check_name
from ..units import human_bytes
from ._common import add_config_args, load, open_store

HELP = "list the checkpoints in the store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--job-id", metavar="ID", help="only this job")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def collect(store: CheckpointStore, job_ids: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for job in job_ids:
        for step in store.steps(job):
            result = store.result(job, step)
            gens = []
            for gen in store.generations(job, step):
                try:
                    m = store.load_manifest(gen)
                    stats = m.get("stats", {})
                    gens.append({"generation": gen.number, "created": m.get("created"), "final": m.get("final"),
                                 "reason": m.get("reason"), "bytes": stats.get("bytes_in", 0),
                                 "bytes_written": stats.get("bytes_written", 0), "node": m.get("node", "")})
                except (DamagedCheckpointError, PermissionDenied) as e:
                    gens.append({"generation": gen.number, "damaged": str(e)})
            rows.append({"job_id": job, "step": step, "generations": gens,
                         "finished": result is not None, "exit_status": (result or {}).get("exit_status")})
    return rows


def main(args: argparse.Namespace) -> int:
    store = open_store(load(args), args)
    if args.job_id:
        check_name("job id", args.job_id)
        if not store.steps(args.job_id):
            raise NotFoundError(f"no job {args.job_id} in {store.root}")
        jobs = [args.job_id]
    else:
        try:
            jobs = store.jobs()
        except StoreError:
            raise
    rows = collect(store, jobs)
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
            print(f"{row['job_id']:<16} {row['step']:<10} {g['generation']:>4}  {g['created']:<24} {kind:<9} "
                  f"{human_bytes(g['bytes']):>10} {human_bytes(g['bytes_written']):>10}  {g['node']}")
    return 0
