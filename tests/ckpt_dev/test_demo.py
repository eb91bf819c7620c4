"""`make demo`'s core, as a newcomer sees it: a real job of an ordinary user survives a Spot notice and the demo says
so, on a machine twice as fast or twice as slow as the calibration measured; Ctrl-C or SIGKILL of the demo leaves
nothing running."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from ckpt_helpers import REPO, processes_of, require_criu, wait_for

from ckpt_agent.errors import CkptError
from ckpt_dev import reaper
from ckpt_dev.demo import DEMO_USER, stop_time_ns, with_stop_time

DEMO = [sys.executable, "-m", "ckpt_dev.demo", "--quick"]
SAFETY_SECONDS = 900  # a safety net only: the demo's steps wait for events


def workdir_of(out: str) -> str:
    first = out.splitlines()[0]
    assert "1/7 starting a local Slurm cluster" in first, out[:2000]
    return first.split(" in ")[-1].strip()


class Demo:
    """The demo as a child process whose output lines are read as they come."""

    def __init__(self, *args: str):
        # a process group of its own, as in a terminal: Ctrl-C there signals the whole foreground group
        self.proc = subprocess.Popen([*DEMO, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_line(self, text: str, timeout: float = SAFETY_SECONDS) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the demo did not print {text!r} within {timeout:g} s:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"the demo ended without printing {text!r}:\n{self.output()}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = SAFETY_SECONDS) -> str:
        self.proc.wait(timeout=timeout)
        while True:
            line = self._queue.get(timeout=30)
            if line is None:
                return self.output()
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self, workdir: str = "") -> None:
        """Whatever happened in the test: the demo and all it started are gone afterwards."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a child of the demo still in its group (a calibration run)
        except ProcessLookupError:
            pass
        if workdir:
            reaper.stop_workdir(workdir)


def test_the_simulation_is_sized_by_its_stop_time():
    text = with_stop_time((REPO / "examples" / "ringosc.cir").read_text(), 2345.6)
    assert "\n.tran 50p 2346n 0 1p uic\n" in text
    with pytest.raises(CkptError, match="no .tran line"):
        with_stop_time("* no analysis\n.end\n", 100)


@pytest.mark.parametrize(("tstop", "ns"), [("1.2u", 1200), ("1.2us", 1200), ("350n", 350), ("2.5e-7", 250),
                                           ("1500P", 1.5), ("1m", 1e6), ("2meg", 2e15), (".5u", 500)])
def test_the_stop_time_is_read_in_spice_s_units(tstop, ns):
    assert stop_time_ns(f"* x\n.tran 50p {tstop} 0 1p uic\n.end\n") == pytest.approx(ns)


def test_the_example_s_stop_time_is_what_with_stop_time_writes():
    example = (REPO / "examples" / "ringosc.cir").read_text()
    assert stop_time_ns(example) == pytest.approx(1200)
    assert stop_time_ns(with_stop_time(example, 350)) == pytest.approx(350)


@pytest.mark.parametrize("netlist", ["* no analysis\n.end\n", ".tran 50p\n.end\n", ".tran 50p soon\n"])
def test_a_netlist_without_a_stop_time_is_one_clear_error(netlist):
    with pytest.raises(CkptError, match="no .tran line with a stop time"):
        stop_time_ns(netlist)


def test_the_line_after_a_tran_without_a_stop_time_is_not_taken_for_one():
    with pytest.raises(CkptError, match="no .tran line to size"):
        with_stop_time(".tran 50p\n.end\n", 100)


@pytest.mark.slurm
@pytest.mark.criu
@pytest.mark.slow
@pytest.mark.parametrize("sim_scale, mode", [("0.5", []), ("2", []), ("0.5", ["--transparent"])],
                         ids=["twice-as-fast", "twice-as-slow", "transparent-twice-as-fast"])
def test_demo_moves_the_job_and_matches_an_uninterrupted_run(sim_scale, mode):
    """The calibrated simulation scaled by 0.5 behaves as on a machine twice as fast as the calibration measured,
    by 2 as on one twice as slow: the notice still comes after a periodic checkpoint, and the job still moves. In
    transparent mode the script has no `ckpt run`: the job_submit plugin wraps it, with the same outcome."""
    require_criu()
    res = subprocess.run([*DEMO, "--sim-scale", sim_scale, *mode], cwd=REPO, capture_output=True, text=True,
                         timeout=SAFETY_SECONDS)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-2000:]
    if mode:
        assert "transparent mode: slurmctld runs the job_submit plugin" in out and "no ckpt run" in out
    for expected in (f"as the ordinary user '{DEMO_USER}'", f"(sim scale {sim_scale})",
                     f"of user '{DEMO_USER}' is RUNNING on node1", "periodic checkpoint 1 committed on node1",
                     "received the Spot notice", "FINAL checkpoint", "drained", "job requeued",
                     "restored on node2", "COMPLETED on node2", "result.txt MATCHES", "reads as one uninterrupted run",
                     "ckpt report --job-id", "removed", "SUCCESS"):
        assert expected in out, (expected, out[-3000:])
    assert "root lacks" not in out and "as user 'root'" not in out
    order = ("periodic checkpoint 1 committed on node1", "injecting a Spot interruption notice", "FINAL checkpoint",
             "job requeued", "restored on node2")
    assert [out.index(text) for text in order] == sorted(out.index(text) for text in order), out[-3000:]
    workdir = workdir_of(out)
    assert processes_of(workdir) == [], "the demo left processes behind"
    assert not os.path.exists(workdir)


@pytest.mark.slurm
@pytest.mark.criu
def test_ctrl_c_stops_everything_the_demo_started():
    require_criu()
    demo = Demo()
    workdir = ""
    try:
        workdir = workdir_of(demo.wait_line("1/7 starting a local Slurm cluster"))
        demo.wait_line("job started on node1")  # the job's first event: cluster, agents, job and tool all run
        assert processes_of(workdir)
        os.killpg(demo.proc.pid, signal.SIGINT)  # Ctrl-C: the demo and every child still in its process group
        out = demo.finish()
    finally:
        demo.kill(workdir)
    assert demo.proc.returncode == 130, out
    assert "interrupted" in out and "stopping the cluster" in out
    assert processes_of(workdir) == [], f"processes of {workdir} survived Ctrl-C"
    assert not os.path.exists(workdir)


@pytest.mark.slurm
@pytest.mark.criu
def test_sigkill_of_the_demo_leaves_nothing_running():
    """The demo cannot clean up after SIGKILL: the cluster's watchdog stops the daemons, the agents, the job and the
    reference run."""
    require_criu()
    demo = Demo("--keep")
    workdir = ""
    try:
        workdir = workdir_of(demo.wait_line("1/7 starting a local Slurm cluster"))
        demo.wait_line("job started on node1")
        assert processes_of(workdir)
        demo.proc.send_signal(signal.SIGKILL)
        demo.finish()
        wait_for(lambda: not processes_of(workdir), 120, f"the watchdog to stop what the demo in {workdir} started")
        with open(os.path.join(workdir, "log", "watchdog.log"), encoding="utf-8") as fh:
            assert "went away without stopping it" in fh.read()
    finally:
        demo.kill(workdir)
    shutil.rmtree(workdir)
