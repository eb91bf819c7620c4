"""`make demo` (`python -m ckpt_agent.demo`): the whole story on one machine, for real.

  1. a local Slurm cluster (munge, slurmctld, two slurmd), an IMDS endpoint and a node agent per node, and a
     shared store directory standing in for FSx — the same code the end-to-end tests use;
  2. a real ngspice simulation submitted with `sbatch` under `ckpt run` (as an ordinary user where this machine
     lets root checkpoint other users' processes), running on node1 with periodic checkpoints;
  3. a Spot interruption notice injected on node1's IMDS, and what follows, narrated from the job's events:
     notice, final checkpoint, drain, requeue, resume on node2, completion;
  4. the result compared with an uninterrupted run of the same simulation;
  5. `ckpt report` for the job, then `ckpt gc` removing the finished job's checkpoints;
  6. everything stopped, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .devcluster import shared_venv
from .devcluster.agents import NodeAgents
from .devcluster.slurm_cluster import LocalCluster
from .errors import CkptError

REPO = Path(__file__).resolve().parent.parent
DEMO_USER = "ckpt-demo"
PRICES = {"r6i.large": {"spot": 0.0425, "ondemand": 0.126}}  # us-east-1 list prices, for the report's arithmetic


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def describe(event: Dict) -> Optional[str]:
    kind = event["event"]
    where = f"{event.get('node', '?')} ({event.get('instance_id') or '-'})"
    if kind == "segment_started":
        how = ("resumed from checkpoint " + str(event.get("generation"))) if event.get("how") == "restored" else "fresh"
        return f"job started on {where}: {how}"
    if kind == "checkpoint_committed":
        size = event.get("bytes_in", 0) / 2**20
        written = event.get("bytes_written", 0) / 2**20
        kind_txt = "FINAL checkpoint" if event.get("final") else f"{event.get('reason')} checkpoint"
        return (f"{kind_txt} {event.get('generation')} committed on {where}: {size:.0f} MiB captured, "
                f"{written:.1f} MiB new data written, tool frozen {event.get('frozen_seconds', 0):.2f} s, "
                f"total {event.get('seconds', 0):.2f} s")
    if kind == "notice_received":
        return f"node agent on {where} received the Spot notice: {event.get('action')} at {event.get('notice_time')}"
    if kind == "drained":
        return f"node {event.get('node')} drained: {event.get('reason')}"
    if kind == "requeued":
        return "job requeued in Slurm"
    if kind == "restored":
        return (f"restored on {where} from checkpoint {event.get('generation')} in {event.get('seconds', 0):.2f} s "
                f"(SLURM_RESTART_COUNT={event.get('restart_count')})")
    if kind == "segment_ended":
        return f"job segment on {where} ended: {event.get('how')}" + (
            f", exit status {event['exit_status']}" if "exit_status" in event else "")
    if kind in ("checkpoint_failed", "requeue_failed"):
        return f"{kind.replace('_', ' ')}: {event.get('error')}"
    return None


class Demo:
    def __init__(self, netlist: Path, interval: int, keep: bool):
        self.netlist = netlist
        self.interval = interval
        self.keep = keep
        self.workdir = tempfile.mkdtemp(prefix="ckpt-demo-", dir="/tmp")
        os.chmod(self.workdir, 0o755)
        self.cluster: Optional[LocalCluster] = None
        self.agents: Optional[NodeAgents] = None
        self.reference: Optional[subprocess.Popen] = None
        self.seen = 0

    def ckpt(self, *args: str, node: str = "node1") -> subprocess.CompletedProcess:
        env = self.cluster.env({"CKPT_CONFIG": self.agents.config_path(node)})
        return subprocess.run([os.path.join(self.agents.bin_dir, "ckpt"), *args], env=env, text=True,
                              capture_output=True, timeout=120)

    def narrate(self, job: str) -> None:
        path = Path(self.cluster.store) / job / "events.jsonl"
        try:
            text = path.read_text()
        except OSError:
            return
        # only complete lines: an event being appended right now is read on the next pass, not skipped
        lines = text[: text.rfind("\n") + 1].splitlines()
        for line in lines[self.seen:]:
            try:
                text = describe(json.loads(line))
            except ValueError:
                continue
            if text:
                say("  " + text)
        self.seen = len(lines)

    def run(self) -> int:
        say("1/7 starting a local Slurm cluster (munge, slurmctld, slurmd node1 + node2) in " + self.workdir)
        self.cluster = LocalCluster(self.workdir, accounting=bool(shutil.which("slurmdbd")))
        self.cluster.start()
        bin_dir = shared_venv.refresh()
        self.agents = NodeAgents(self.cluster, bin_dir, extra_config={
            "prices": PRICES, "checkpoint": {"interval": self.interval}, "gc": {"grace": 0}})
        self.agents.start()
        say("    node agents polling their own IMDS endpoints: " +
            ", ".join(f"{n} -> {i.url}" for n, i in self.agents.imds.items()))
        say(f"    shared checkpoint store (FSx stand-in): {self.cluster.store}")

        user = DEMO_USER
        self.cluster.ensure_user(user)
        work = Path(self.cluster.user_dir(user)) / "sim"
        work.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.netlist, work / "circuit.cir")
        shutil.chown(work, user, user)
        shutil.chown(work / "circuit.cir", user, user)
        ref = Path(self.workdir) / "reference"
        ref.mkdir()
        shutil.copy(self.netlist, ref / "circuit.cir")
        self.reference = subprocess.Popen(["ngspice", "-b", "circuit.cir"], cwd=ref, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)

        say(f"2/7 submitting a real ngspice transient simulation as user '{user}' (sbatch ... ckpt run -- ngspice)")
        script = (f"#!/bin/bash\n#SBATCH --job-name=ringosc --requeue --open-mode=append -o job.out -e job.err\n"
                  f"set -euo pipefail\ncd {work}\n{bin_dir}/ckpt run --interval {self.interval} -- "
                  f"ngspice -b circuit.cir\n")
        job = self.cluster.sbatch(script, user=user, cwd=str(work))
        info = self.cluster.wait_job(job, "RUNNING", timeout=60)
        say(f"    job {job} is RUNNING on {info.nodes}; periodic checkpoints every {self.interval} s")
        deadline = time.monotonic() + self.interval * 2 + 20
        while time.monotonic() < deadline:
            self.narrate(job)
            if list((Path(self.cluster.store) / job / "main").glob("gen-*")):
                break
            time.sleep(0.5)
        time.sleep(1)
        self.narrate(job)

        say("3/7 injecting a Spot interruption notice on node1's IMDS (instance terminates in 120 s)")
        notice = self.agents.imds["node1"].inject_spot_notice("terminate", seconds_from_now=120)
        say(f"    IMDS now answers /latest/meta-data/spot/instance-action with {json.dumps(notice)}")
        t_notice = time.monotonic()
        final = None
        while final is None:
            self.narrate(job)
            state = self.cluster.job_info(job)
            if state.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
                final = state
            elif time.monotonic() - t_notice > 600:
                raise CkptError(f"job {job} did not finish within 10 minutes of the notice (state {state.state})")
            time.sleep(0.5)
        self.narrate(job)
        say(f"    job {job} {final.state} on {final.nodes} after {final.restart_count} requeue(s)")

        say("4/7 comparing with an uninterrupted run of the same simulation")
        self.reference.wait(timeout=600)
        same = (work / "result.txt").read_bytes() == (ref / "result.txt").read_bytes()
        say(f"    result.txt {'MATCHES' if same else 'DIFFERS FROM'} the uninterrupted run "
            f"({(work / 'result.txt').stat().st_size} bytes)")
        out_same = (work / "job.out").read_bytes() == subprocess.run(
            ["ngspice", "-b", "circuit.cir"], cwd=ref, capture_output=True, timeout=600).stdout
        say(f"    job.out {'reads as one uninterrupted run' if out_same else 'differs from an uninterrupted run'}")

        say(f"5/7 ckpt report --job-id {job}")
        report = self.ckpt("report", "--job-id", job)
        print(report.stdout or report.stderr, flush=True)

        say("6/7 ckpt gc (demo grace period 0 s): the finished job's checkpoints go")
        gc = self.ckpt("gc", "--grace", "0")
        print(gc.stdout or gc.stderr, flush=True)
        ok = final.state == "COMPLETED" and final.restart_count >= 1 and final.nodes == "node2" and same
        say("7/7 " + ("SUCCESS: the job survived the Spot interruption and finished on node2 with the same result"
                      if ok else "FAILURE: see above"))
        return 0 if ok else 1

    def stop(self) -> None:
        say("stopping the cluster, agents and IMDS endpoints")
        if self.reference and self.reference.poll() is None:
            self.reference.kill()
        if self.agents:
            self.agents.stop()
        if self.cluster:
            self.cluster.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            say(f"kept {self.workdir} for inspection")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_agent.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 15 s simulation instead of about a minute")
    parser.add_argument("--interval", type=int, default=10, help="periodic checkpoint interval (default 10 s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, store) afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("make demo needs root (it starts Slurm daemons and CRIU)", file=sys.stderr)
        return 77
    netlist = REPO / "examples" / ("ringosc.cir" if args.quick else "ringosc-long.cir")
    demo = Demo(netlist, args.interval, args.keep)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        return demo.run()
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except CkptError as e:
        say(f"demo failed: {e}")
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
