"""Time from a Spot interruption notice to checkpoint start and to requeue, with 1 and 4 jobs on a node.

Runs the real path on the local Slurm cluster (`ckpt_dev`): jobs submitted with sbatch under
`ckpt run`, a node agent polling its own IMDS endpoint, a notice injected there. Times come from the events the
agent and the wrappers record (notice_received, checkpoint_started, checkpoint_committed, requeued), measured from
the moment the notice was injected, so the agent's IMDS poll interval is part of the figure, as it is on EC2.

    python bench/notice_bench.py [--jobs 1,4] [--mib 256] [--poll-interval 2]

The budget to compare with: EC2 gives 120 s; the agent stops `deadline_margin` (20 s) short of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ckpt_agent.store.generations import parse_iso  # noqa: E402
from ckpt_dev import shared_venv  # noqa: E402
from ckpt_dev.agents import NodeAgents  # noqa: E402
from ckpt_dev.slurm_cluster import LocalCluster  # noqa: E402

BUDGET_SECONDS = 120 - 20  # notice lead time minus the agent's default deadline margin


def run_case(cluster: LocalCluster, agents: NodeAgents, jobs: int, mib: int) -> dict:
    bin_dir = agents.bin_dir
    ids = []
    for i in range(jobs):
        work = Path(cluster.user_dir("root")) / f"bench-{jobs}-{i}"
        work.mkdir(parents=True, exist_ok=True)
        script = (f"#!/bin/bash\n#SBATCH --requeue --open-mode=append -o job.out -e job.err\nset -euo pipefail\n"
                  f"cd {work}\n{bin_dir}/ckpt run -- python3 {REPO / 'bench' / 'memhog.py'} {mib} random 0\n")
        ids.append(cluster.sbatch(script, cwd=str(work)))
    for job in ids:
        info = cluster.wait_job(job, "RUNNING", timeout=120)
        if info.nodes != "node1":
            raise RuntimeError(f"job {job} started on {info.nodes}, not node1: free node1 first")
    for i, job in enumerate(ids):  # every tool has filled its memory
        ready = Path(cluster.user_dir("root")) / f"bench-{jobs}-{i}" / "ready"
        deadline = time.monotonic() + 120
        while not ready.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job} never filled its memory")
            time.sleep(0.2)
    cluster.scontrol("update", "NodeName=node2", "State=DRAIN", "Reason=bench")  # requeued jobs wait: no restore
    injected = datetime.now(timezone.utc)
    agents.imds["node1"].inject_spot_notice("terminate", seconds_from_now=120)
    events = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        events = {j: _events(cluster, j) for j in ids}
        if all(any(e["event"] == "requeued" for e in ev) for ev in events.values()):
            break
        time.sleep(0.2)
    else:
        raise RuntimeError("not every job was requeued within 180 s")
    agents.imds["node1"].clear()

    def first(kind, ev):
        times = [parse_iso_z(e["time"]) for e in ev if e["event"] == kind]
        return (min(times) - injected).total_seconds() if times else float("nan")

    starts = [first("checkpoint_started", ev) for ev in events.values()]
    commits = [first("checkpoint_committed", ev) for ev in events.values()]
    requeues = [first("requeued", ev) for ev in events.values()]
    sizes = [sum(e.get("bytes_in", 0) for e in ev if e["event"] == "checkpoint_committed") for ev in events.values()]
    for job in ids:
        subprocess.run(["scancel", job], env=cluster.env(), check=False, timeout=30)
    cluster.scontrol("update", "NodeName=node1", "State=RESUME")
    cluster.scontrol("update", "NodeName=node2", "State=RESUME")
    return {"jobs": jobs, "mib": mib, "notice_to_first_start": min(starts), "notice_to_last_start": max(starts),
            "notice_to_last_commit": max(commits), "notice_to_last_requeue": max(requeues),
            "checkpointed_mib": sum(sizes) / 2**20}


def parse_iso_z(text: str) -> datetime:
    return parse_iso(text if "." in text else text.replace("Z", ".000000Z"))


def _events(cluster: LocalCluster, job: str) -> list:
    path = Path(cluster.store) / job / "events.jsonl"
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,4", help="jobs on the interrupted node, per case (default 1,4)")
    parser.add_argument("--mib", type=int, default=256, help="memory per job (random, incompressible)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="the agent's IMDS poll interval")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (Slurm daemons, CRIU)", file=sys.stderr)
        return 77
    workdir = tempfile.mkdtemp(prefix="ckpt-notice-bench-", dir="/tmp")
    os.chmod(workdir, 0o755)
    cluster = LocalCluster(workdir, cpus_per_node=8)
    agents = None
    rows = []
    try:
        cluster.start()
        agents = NodeAgents(cluster, shared_venv.refresh(), poll_interval=args.poll_interval).start()
        for n in (int(x) for x in args.jobs.split(",")):
            rows.append(run_case(cluster, agents, n, args.mib))
    finally:
        if agents:
            agents.stop()
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"notice -> checkpoint start / commit / requeue, seconds (poll interval {args.poll_interval:g} s, "
          f"{args.mib} MiB of random memory per job; budget {BUDGET_SECONDS} s)")
    print(f"{'jobs':>4} {'first start':>12} {'last start':>11} {'last commit':>12} {'last requeue':>13} "
          f"{'MiB saved':>10}  within budget")
    for r in rows:
        ok = r["notice_to_last_requeue"] < BUDGET_SECONDS
        print(f"{r['jobs']:>4} {r['notice_to_first_start']:>12.2f} {r['notice_to_last_start']:>11.2f} "
              f"{r['notice_to_last_commit']:>12.2f} {r['notice_to_last_requeue']:>13.2f} "
              f"{r['checkpointed_mib']:>10.0f}  {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
