"""`make demo` (`python -m ckpt_dev.demo`): the whole story on one machine, for real.

  1. a local Slurm cluster (munge, slurmctld, two slurmd), an IMDS endpoint and a node agent per node, and a
     shared store directory standing in for FSx — the same code the end-to-end tests use;
  2. a real ngspice simulation, sized for this machine: a short calibration run is timed, and the simulated time
     is chosen so that the job outlives several checkpoint intervals here, however fast or slow the machine is. It
     is submitted with `sbatch` under `ckpt run` as an ordinary user, and runs on node1 with periodic checkpoints;
  3. once a periodic checkpoint has committed (the job's events say so), a Spot interruption notice is injected on
     node1's IMDS, and what follows is narrated from the job's events: notice, final checkpoint, drain, requeue,
     resume on node2, completion;
  4. the result compared with an uninterrupted run of the same simulation;
  5. `ckpt report` for the job, then `ckpt gc` removing the finished job's checkpoints;
  6. everything stopped, also on Ctrl-C; if the demo itself is killed, the cluster's watchdog stops what is left.

With --transparent the cluster runs the job_submit plugin `ckpt render` makes for a queue with transparent
checkpointing, and the job script is an unmodified one, without `ckpt run`: the plugin wraps the whole script.

Nothing waits for a guessed amount of time: each step waits for an event (a job state, an event line), with
timeouts only as safety nets. `--sim-scale` (or CKPT_DEMO_SIM_SCALE) multiplies the calibrated simulation length:
0.5 runs the demo as a machine twice as fast as the calibration measured would, 2 as one twice as slow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from ckpt_agent.errors import CkptError, ConfigError
from ckpt_agent.site import render
from ckpt_agent.store import event_names as ev
from ckpt_dev import shared_venv
from ckpt_dev.agents import NodeAgents
from ckpt_dev.slurm_cluster import ClusterError, LocalCluster

REPO = Path(__file__).resolve().parent.parent
NETLIST = REPO / "examples" / "ringosc.cir"
DEMO_USER = "ckpt-demo"  # an ordinary local user, created by the demo (LocalCluster.ensure_user) when missing
# simulated time of a calibration run: 0.5-0.6 s of ngspice on the 2-vCPU dev VM (the demo prints it), about 25 s in
# the kernel check's emulated guest (there 350 ns took 88 s; 2026-12-06)
CALIBRATION_NS = 100
CALIBRATION_RUNS = 2  # the faster one counts
CALIBRATION_TIMEOUT_SECONDS = 600  # a safety net against a hung ngspice, not an expected time
# How many checkpoint intervals the simulation should last here: the notice comes after the first periodic
# checkpoint, and with a simulation half as long as planned (--sim-scale 0.5, or a calibration that ran on a loaded
# machine) it must still be running by then.
INTERVALS_OF_WORK = {"quick": 4, "full": 6}
FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE")
PRICES = {"r6i.large": {"spot": 0.0425, "ondemand": 0.126}}  # us-east-1 list prices, for the report's arithmetic


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def describe(event: Dict) -> Optional[str]:
    kind = event["event"]
    where = f"{event.get('node', '?')} ({event.get('instance_id') or '-'})"
    if kind == ev.SEGMENT_STARTED:
        how = ("resumed from checkpoint " + str(event.get("generation"))) if event.get("how") == "restored" else "fresh"
        return f"job started on {where}: {how}"
    if kind == ev.CHECKPOINT_COMMITTED:
        size = event.get("bytes_in", 0) / 2**20
        written = event.get("bytes_written", 0) / 2**20
        kind_txt = "FINAL checkpoint" if event.get("final") else f"{event.get('reason')} checkpoint"
        return (f"{kind_txt} {event.get('generation')} committed on {where}: {size:.0f} MiB captured, "
                f"{written:.1f} MiB new data written, tool frozen {event.get('frozen_seconds', 0):.2f} s, "
                f"total {event.get('seconds', 0):.2f} s")
    if kind == ev.NOTICE_RECEIVED:
        return f"node agent on {where} received the Spot notice: {event.get('action')} at {event.get('notice_time')}"
    if kind == ev.DRAINED:
        return f"node {event.get('node')} drained: {event.get('reason')}"
    if kind == ev.REQUEUED:
        return "job requeued in Slurm"
    if kind == ev.RESTORED:
        return (f"restored on {where} from checkpoint {event.get('generation')} in {event.get('seconds', 0):.2f} s "
                f"(SLURM_RESTART_COUNT={event.get('restart_count')})")
    if kind == ev.SEGMENT_ENDED:
        return f"job segment on {where} ended: {event.get('how')}" + (
            f", exit status {event['exit_status']}" if "exit_status" in event else "")
    if kind in (ev.CHECKPOINT_FAILED, ev.REQUEUE_FAILED):
        return f"{kind.replace('_', ' ')}: {event.get('error')}"
    return None


def ngspice_seconds_per_ns(workdir: Path, runs: int = CALIBRATION_RUNS, env: Optional[Dict[str, str]] = None) -> float:
    """Seconds of ngspice work per simulated nanosecond on this machine: the faster of `runs` timed runs of the
    example's first CALIBRATION_NS, in `workdir` (ngspice starts in milliseconds). A run slowed by a burst of other work
    would make a simulation sized from it come out short, the unsafe side; the faster run errs towards a longer one."""
    (workdir / "circuit.cir").write_text(with_stop_time(NETLIST.read_text(), CALIBRATION_NS))
    seconds = []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(["ngspice", "-b", "circuit.cir"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=CALIBRATION_TIMEOUT_SECONDS)
        seconds.append(time.monotonic() - started)
    return min(seconds) / CALIBRATION_NS


TRAN_LINE = re.compile(r"(?im)^(\.tran[ \t]+\S+[ \t]+)(\S+)")  # `.tran TSTEP TSTOP ...`: TSTOP, the second field
# SPICE's scale factors (case-insensitive; "meg" before "m", which is milli); letters after one are ignored ("1.2us")
SPICE_SCALE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)(meg|[tgkmunpf])?[a-z]*$", re.IGNORECASE)
SPICE_FACTORS = {None: 1.0, "t": 1e12, "g": 1e9, "meg": 1e6, "k": 1e3, "m": 1e-3, "u": 1e-6, "n": 1e-9, "p": 1e-12,
                 "f": 1e-15}


def stop_time_ns(netlist: str) -> float:
    """Where the netlist's transient analysis ends, in nanoseconds (its `.tran` line's TSTOP, SPICE's units)."""
    tran = TRAN_LINE.search(netlist)
    value = SPICE_SCALE.match(tran.group(2)) if tran else None
    if not value:
        raise ConfigError(f"{NETLIST}: no .tran line with a stop time to size the simulation with")
    suffix = value.group(2).lower() if value.group(2) else None
    return float(value.group(1)) * SPICE_FACTORS[suffix] * 1e9


def with_stop_time(netlist: str, stop_ns: float) -> str:
    """The netlist with its transient analysis (`.tran TSTEP TSTOP ...`) ending at `stop_ns` nanoseconds."""
    text, count = TRAN_LINE.subn(lambda m: f"{m.group(1)}{stop_ns:.0f}n", netlist, count=1)
    if count != 1:
        raise ConfigError(f"{NETLIST}: no .tran line to size the simulation with")
    return text


class Demo:
    def __init__(self, interval: float, work_intervals: float, sim_scale: float, keep: bool,
                 transparent: bool = False):
        self.interval = interval
        self.transparent = transparent
        self.work_seconds = interval * work_intervals  # how long the simulation should run on this machine
        self.sim_scale = sim_scale
        self.keep = keep
        self.workdir = tempfile.mkdtemp(prefix="ckpt-demo-", dir="/tmp")
        os.chmod(self.workdir, 0o755)
        self.cluster: Optional[LocalCluster] = None
        self.agents: Optional[NodeAgents] = None
        self.reference: Optional[subprocess.Popen] = None
        self.seen = 0
        self.events: List[Dict] = []

    def ckpt(self, *args: str, node: str = "node1") -> subprocess.CompletedProcess:
        env = self.cluster.env({"CKPT_CONFIG": self.agents.config_path(node)})
        return subprocess.run([os.path.join(self.agents.bin_dir, "ckpt"), *args], env=env, text=True,
                              capture_output=True, timeout=120)

    def narrate(self, job: str) -> List[Dict]:
        """Tell the job's new events; return them."""
        path = Path(self.cluster.store) / job / "events.jsonl"
        try:
            text = path.read_text()
        except OSError:
            return []
        # only complete lines: an event being appended right now is read on the next pass, not skipped
        lines = text[: text.rfind("\n") + 1].splitlines()
        new = []
        for line in lines[self.seen:]:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            new.append(event)
            told = describe(event)
            if told:
                say("  " + told)
        self.seen = len(lines)
        self.events.extend(new)
        return new

    def calibrate(self) -> float:
        """Seconds of ngspice work per simulated nanosecond on this machine (ngspice_seconds_per_ns)."""
        cal = Path(self.workdir) / "calibration"
        cal.mkdir()
        return ngspice_seconds_per_ns(cal, env=self.cluster.env())

    def wait_for_periodic_checkpoint(self, job: str) -> Dict:
        """Narrate until the job's first periodic checkpoint commits; its event. The job ending first is an error
        that says what to change."""
        deadline = time.monotonic() + self.interval * 3 + 120  # a safety net: the checkpoint comes after `interval`
        while True:
            for event in self.narrate(job):
                if event["event"] == ev.CHECKPOINT_COMMITTED and not event.get("final"):
                    return event
            state = self.cluster.job_info(job).state
            if state in FINISHED_STATES:
                self.narrate(job)
                raise ClusterError(f"job {job} ended ({state}) before its first periodic checkpoint: the simulation "
                                  f"was sized to run {self.work_seconds * self.sim_scale:.0f} s here but finished "
                                  "sooner (a larger --sim-scale makes it longer)")
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job} committed no periodic checkpoint within "
                                  f"{self.interval * 3 + 120:.0f} s (state {state}); see the agents' logs in "
                                  f"{self.cluster.log_dir}")
            time.sleep(0.5)

    def run(self) -> int:
        say("1/7 starting a local Slurm cluster (munge, slurmctld, slurmd node1 + node2) in " + self.workdir)
        bin_dir = shared_venv.refresh()
        lua = None
        if self.transparent:  # the plugin `ckpt render` emits for a queue with checkpoint.transparent
            lua = render.render_job_submit(
                header="generated by the demo from templates/job_submit.lua.j2", partitions=["batch"],
                default_partition="batch", ckpt=os.path.join(bin_dir, "ckpt"), opt_out_comment="ckpt:off",
                opt_out_env="CKPT_TRANSPARENT")
        self.cluster = LocalCluster(self.workdir, accounting=bool(shutil.which("slurmdbd")), job_submit_lua=lua)
        self.cluster.start()
        if self.transparent:  # the wrapped script's `ckpt run` takes its interval from the jobs' config
            self.cluster.write_job_config({"checkpoint": {"interval": self.interval}})
            say("    transparent mode: slurmctld runs the job_submit plugin, which wraps every batch script of "
                "partition 'batch' in `ckpt run --name batch`")
        self.agents = NodeAgents(self.cluster, bin_dir, extra_config={
            "prices": PRICES, "gc": {"grace": 0}})  # the interval is the job's: `ckpt run --interval`
        self.agents.start()
        say("    node agents polling their own IMDS endpoints: " +
            ", ".join(f"{n} -> {i.url}" for n, i in self.agents.imds.items()))
        say(f"    shared checkpoint store (FSx stand-in): {self.cluster.store}")

        user = DEMO_USER
        uid, _ = self.cluster.ensure_user(user)
        say("2/7 sizing a real ngspice transient simulation for this machine")
        per_ns = self.calibrate()
        stop_ns = self.work_seconds * self.sim_scale / per_ns
        netlist = with_stop_time(NETLIST.read_text(), stop_ns)
        say(f"    {CALIBRATION_NS} ns of simulated time take {per_ns * CALIBRATION_NS:.1f} s here: simulating "
            f"{stop_ns / 1000:.2f} us, about {self.work_seconds * self.sim_scale:.0f} s of work here"
            + (f" (sim scale {self.sim_scale:g})" if self.sim_scale != 1 else ""))
        work = Path(self.cluster.user_dir(user)) / "sim"
        work.mkdir(parents=True, exist_ok=True)
        (work / "circuit.cir").write_text(netlist)
        shutil.chown(work, user, user)
        shutil.chown(work / "circuit.cir", user, user)
        ref = Path(self.workdir) / "reference"
        ref.mkdir()
        (ref / "circuit.cir").write_text(netlist)
        with open(ref / "job.out", "wb") as ref_out:  # the reference's stdout, to compare with the job's output
            # its own session: Ctrl-C reaches the demo, which stops it; SLURM_CONF in its environment marks it as
            # the cluster's, for the watchdog should the demo be killed
            self.reference = subprocess.Popen(["ngspice", "-b", "circuit.cir"], cwd=ref, env=self.cluster.env(),
                                              stdout=ref_out, stderr=subprocess.DEVNULL, start_new_session=True)

        if self.transparent:
            say(f"    submitting it as the ordinary user '{user}' (uid {uid}), not root: an unmodified script "
                "(`ngspice -b circuit.cir`, no ckpt run); the node agent (root) checkpoints the user's job with CRIU")
            script = (f"#!/bin/bash\n#SBATCH --job-name=ringosc -o job.out -e job.err\n"
                      f"set -euo pipefail\ncd {work}\nngspice -b circuit.cir\n")
        else:
            say(f"    submitting it as the ordinary user '{user}' (uid {uid}), not root: sbatch ... ckpt run -- "
                "ngspice; the node agent (root) checkpoints the user's job with CRIU")
            script = (f"#!/bin/bash\n#SBATCH --job-name=ringosc --requeue --open-mode=append -o job.out -e job.err\n"
                      f"set -euo pipefail\ncd {work}\n{bin_dir}/ckpt run --interval {self.interval:g} -- "
                      f"ngspice -b circuit.cir\n")
        job = self.cluster.sbatch(script, user=user, cwd=str(work))
        info = self.cluster.wait_job(job, "RUNNING", timeout=60)
        say(f"    job {job} of user '{user}' is RUNNING on {info.nodes}; periodic checkpoints every "
            f"{self.interval:g} s")
        periodic = self.wait_for_periodic_checkpoint(job)

        say(f"3/7 periodic checkpoint {periodic.get('generation')} is committed: injecting a Spot interruption "
            "notice on node1's IMDS (instance terminates in 120 s)")
        notice = self.agents.imds["node1"].inject_spot_notice("terminate", seconds_from_now=120)
        say(f"    IMDS now answers /latest/meta-data/spot/instance-action with {json.dumps(notice)}")
        deadline = time.monotonic() + 600 + self.work_seconds * self.sim_scale * 3  # a safety net
        while True:
            self.narrate(job)
            final = self.cluster.job_info(job)
            if final.state in FINISHED_STATES:
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job} did not finish in time after the notice (state {final.state})")
            time.sleep(0.5)
        self.narrate(job)
        say(f"    job {job} {final.state} on {final.nodes} after {final.restart_count} requeue(s)")
        moved = any(e["event"] == ev.CHECKPOINT_COMMITTED and e.get("final") for e in self.events)

        say("4/7 comparing with an uninterrupted run of the same simulation")
        self.reference.wait(timeout=600 + self.work_seconds * self.sim_scale * 3)
        result = _read(work / "result.txt")
        same = result is not None and result == _read(ref / "result.txt")
        say(f"    result.txt {'MATCHES' if same else 'DIFFERS FROM'} the uninterrupted run "
            f"({len(result or b'')} bytes)")
        output = _read(work / "job.out")
        out_same = output is not None and output == _read(ref / "job.out")
        say(f"    job.out {'reads as one uninterrupted run' if out_same else 'differs from an uninterrupted run'}")

        say(f"5/7 ckpt report --job-id {job}")
        report = self.ckpt("report", "--job-id", job)
        print(report.stdout or report.stderr, flush=True)

        say("6/7 ckpt gc (demo grace period 0 s): the finished job's checkpoints go")
        gc = self.ckpt("gc", "--grace", "0")
        print(gc.stdout or gc.stderr, flush=True)
        ok = (final.state == "COMPLETED" and final.restart_count >= 1 and final.nodes == "node2" and moved and same
              and out_same)
        say("7/7 " + ("SUCCESS: the job survived the Spot interruption and finished on node2 with the same result"
                      if ok else "FAILURE: see above"))
        return 0 if ok else 1

    def stop(self) -> None:
        say("stopping the cluster, agents and IMDS endpoints")
        if self.reference and self.reference.poll() is None:
            self.reference.kill()
            self.reference.wait()
        if self.agents:
            self.agents.stop()
        if self.cluster:
            self.cluster.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            say(f"kept {self.workdir} for inspection")


def _read(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckpt_dev.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a simulation of about {INTERVALS_OF_WORK['quick']} checkpoint intervals instead of "
                             f"{INTERVALS_OF_WORK['full']}")
    parser.add_argument("--interval", type=_positive, default=10,
                        help="periodic checkpoint interval in seconds (default 10)")
    parser.add_argument("--sim-scale", type=_positive, metavar="FACTOR",
                        help="multiply the calibrated simulation length: 0.5 = as on a machine twice as fast as "
                             "measured, 2 = twice as slow (default: $CKPT_DEMO_SIM_SCALE or 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, store) afterwards")
    parser.add_argument("--transparent", action="store_true",
                        help="transparent mode: an unmodified job script, wrapped by the Slurm job_submit plugin")
    args = parser.parse_args(argv)
    if args.sim_scale is None:
        try:
            args.sim_scale = _positive(os.environ.get("CKPT_DEMO_SIM_SCALE", "1"))
        except argparse.ArgumentTypeError as e:
            parser.error(f"CKPT_DEMO_SIM_SCALE {e}")
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    if os.geteuid() != 0:
        print("make demo needs root (it starts Slurm daemons and CRIU)", file=sys.stderr)
        return 77
    demo = Demo(args.interval, INTERVALS_OF_WORK["quick" if args.quick else "full"], args.sim_scale, args.keep,
                args.transparent)
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
