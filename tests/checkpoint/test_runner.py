"""`ckpt run` end to end with real CRIU and real tools: resume after a final checkpoint and after a crash, exit
status and signals through restore, daemonizing tools, damaged generations, a checkpointer killed midway, and
incremental checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ckpt_helpers import (
    DATA,
    REPO,
    criu_binary,
    kill_job,
    page_tool_verdict,
    pages_images,
    registered,
    run_ckpt,
    start_ckpt,
    stop_ckpt_run,
    wait_for,
)

from ckpt_agent import errors

pytestmark = pytest.mark.criu
TOOLS = DATA / "runner"


def generations(env, job):
    res = run_ckpt("list", "--job-id", job, "--json", env=env)
    assert res.returncode == 0, res.stderr
    return [g for row in json.loads(res.stdout) for g in row["generations"]]


def tool_lines(*paths: Path):
    """The tool's own output, without the wrapper's `ckpt:` lines."""
    lines = []
    for p in paths:
        lines += [ln for ln in p.read_text().splitlines() if not ln.startswith("ckpt:")]
    return lines


@pytest.mark.slow
def test_ngspice_resumes_after_final_checkpoint_with_local_dir_gone(ck, tmp_path):
    """Driven by CPU time, not wall-clock time, so a loaded or a faster machine passes the same way: the final
    checkpoint comes once the tool has done 45% of the work, and the resumed run does less than 80% of it."""
    env, store, runtime = ck
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(REPO / "examples" / "ringosc.cir", ref)
    before = _children_cpu()
    subprocess.run(["ngspice", "-b", "ringosc.cir"], cwd=ref, check=True, capture_output=True, timeout=600)
    full = _children_cpu() - before
    expected = hashlib.sha256((ref / "result.txt").read_bytes()).hexdigest()

    scratch = tmp_path / "scratch"  # stands for node-local instance storage
    scratch.mkdir()
    shutil.copy(REPO / "examples" / "ringosc.cir", scratch)
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    first = start_ckpt("run", "--job-id", "101", "--interval", "1000", "--", "ngspice", "-b", "ringosc.cir",
                       env=env, cwd=scratch, out=out, err=err)
    wait_for(lambda: registered(runtime, "101"), 30, "the wrapper to register")
    init_pid = json.loads((runtime / "jobs" / "101.main.json").read_text())["init_pid"]
    wait_for(lambda: _tree_cpu(init_pid) >= 0.45 * full, 600, "the tool to do 45% of the work")
    res = run_ckpt("checkpoint", "--job-id", "101", "--final", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"
    assert first.wait(timeout=60) == 75
    assert not (scratch / "result.txt").exists(), "the simulation must not have finished before the checkpoint"

    shutil.rmtree(scratch)  # the instance is gone, and its local disk with it
    before = _children_cpu()
    second = run_ckpt("run", "--job-id", "101", "--", "ngspice", "-b", "ringosc.cir", env=env, cwd=tmp_path,
                      timeout=600)
    resumed = _children_cpu() - before  # the wrapper, the restored tool and everything they waited for
    assert second.returncode == 0, second.stderr
    assert "ckpt: resumed job 101 step main from checkpoint 1 taken" in second.stderr
    assert hashlib.sha256((scratch / "result.txt").read_bytes()).hexdigest() == expected
    assert resumed < 0.8 * full, f"the resumed run used {resumed:.1f} s of CPU against {full:.1f} s for a full run"


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tree_cpu(init_pid: int) -> float:
    """CPU seconds used so far by the processes below a namespace init (the tool and its children)."""
    total = 0
    pending = [init_pid]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                pending.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
        if pid != init_pid:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of /proc/PID/stat)
    return total / os.sysconf("SC_CLK_TCK")


def test_crash_after_periodic_checkpoint_resumes_with_consistent_files(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(TOOLS / "appender.py"), "80", "0.1"]
    proc = start_ckpt("run", "--job-id", "102", "--interval", "2", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o1", err=tmp_path / "e1")
    wait_for(lambda: generations(env, "102") if (store / "102").exists() else None, 30, "a periodic checkpoint")
    time.sleep(1.0)  # the tool moves on: its log and result file now hold steps the checkpoint has not seen
    kill_job(proc, runtime, "102")
    steps_before_crash = len((work / "log.txt").read_text().splitlines())

    res = run_ckpt("run", "--job-id", "102", "--", *argv, env=env, cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "inconsistent" not in res.stdout
    assert "ckpt: resumed job 102" in res.stderr
    assert (work / "log.txt").read_text().splitlines() == [f"step {i}" for i in range(80)]
    assert (work / "result.txt").read_text() == "79"
    assert steps_before_crash < 80


def test_output_is_continuous_and_exit_status_passes_through_a_final_checkpoint(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(TOOLS / "appender.py"), "200", "0.05", "3"]
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    proc = start_ckpt("run", "--job-id", "103", "--interval", "1000", "--", *argv, env=env, cwd=work, out=out,
                      err=err)
    wait_for(lambda: registered(runtime, "103") and len(tool_lines(out)) >= 5, 30, "the tool's fifth step")
    assert run_ckpt("checkpoint", "--job-id", "103", "--final", env=env).returncode == 0
    assert proc.wait(timeout=30) == 75
    assert "stopped by final checkpoint 1" in err.read_text()

    with open(out, "ab") as fh:  # Slurm appends the requeued job's output to the same file
        res = subprocess.run([*__import__("ckpt_helpers").ckpt_cmd("run", "--job-id", "103", "--", *argv)],
                             env=env, cwd=work, stdout=fh, stderr=subprocess.PIPE, text=True, timeout=120)
    assert res.returncode == 3, res.stderr
    assert tool_lines(out) == [f"step {i}" for i in range(200)] + ["finished"]

    again = run_ckpt("run", "--job-id", "103", "--", *argv, env=env, cwd=work)
    assert again.returncode == 3
    assert "already finished with status 3" in again.stderr


def test_the_wrapper_measures_the_store_while_the_tool_starts_not_in_its_first_checkpoint(ck, tmp_path):
    """The codec speeds and the store's bandwidth are measured in the background when `ckpt run` starts, so the first
    checkpoint (on a node that has just restored a job, maybe the final one of a notice) does not take them."""
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    proc = None
    try:
        for how in ("launched", "restored"):  # a new wrapper process each time, as on the next node
            err.write_text("")
            proc = start_ckpt("-v", "run", "--job-id", "104", "--interval", "1000", "--", "sleep", "600", env=env,
                              cwd=work, out=out, err=err)
            wanted = ("measured ahead of the first checkpoint", f'"how": "{how}"')
            wait_for(lambda p=proc, w=wanted: all(s in err.read_text() for s in w) or p.poll() is not None, 60,
                     f"the measurement of the wrapper that {how} the tool")
            assert proc.poll() is None, err.read_text()
            assert "checkpoint_started" not in err.read_text()
            wait_for(lambda: registered(runtime, "104"), 30, "the wrapper's registration")
            assert run_ckpt("checkpoint", "--job-id", "104", "--final", env=env).returncode == 0
            assert proc.wait(timeout=60) == 75
        assert not [p for p in store.rglob("*") if "probe" in p.name]
    finally:
        if proc is not None:
            stop_ckpt_run(proc, runtime, "104")


def test_sigterm_reaches_the_tool_before_and_after_restore(ck, tmp_path):
    env, store, runtime = ck
    argv = ["python3", str(TOOLS / "sigterm.py")]
    out, err = tmp_path / "o", tmp_path / "e"
    proc = start_ckpt("run", "--job-id", "104", "--", *argv, env=env, cwd=tmp_path, out=out, err=err)
    wait_for(lambda: "waiting" in out.read_text(), 30, "the tool to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert "got SIGTERM" in out.read_text()

    out2 = tmp_path / "o2"
    proc = start_ckpt("run", "--job-id", "105", "--", *argv, env=env, cwd=tmp_path, out=out2, err=err)
    wait_for(lambda: "waiting" in out2.read_text(), 30, "the tool to start")
    assert run_ckpt("checkpoint", "--job-id", "105", "--final", env=env).returncode == 0
    assert proc.wait(timeout=30) == 75
    proc = start_ckpt("run", "--job-id", "105", "--", *argv, env=env, cwd=tmp_path, out=out2, err=err)
    wait_for(lambda: registered(runtime, "105"), 30, "the resumed wrapper")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert tool_lines(out2) == ["waiting", "got SIGTERM"]


def test_death_by_signal_is_128_plus_n(ck, tmp_path):
    env, _, _ = ck
    res = run_ckpt("run", "--job-id", "106", "--", "python3", "-c",
                   "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", env=env, cwd=tmp_path)
    assert res.returncode == 128 + signal.SIGKILL


def test_daemonizing_tool_stays_part_of_the_job_across_a_checkpoint(ck, tmp_path):
    env, store, runtime = ck
    argv = ["python3", str(TOOLS / "daemonize.py"), "40"]
    proc = start_ckpt("run", "--job-id", "107", "--", *argv, env=env, cwd=tmp_path, out=tmp_path / "o",
                      err=tmp_path / "e")
    wait_for(lambda: (tmp_path / "daemon.log").exists() and "tick 5" in (tmp_path / "daemon.log").read_text(),
             30, "the daemon to work")
    assert run_ckpt("checkpoint", "--job-id", "107", "--final", env=env).returncode == 0
    assert proc.wait(timeout=30) == 75
    res = run_ckpt("run", "--job-id", "107", "--", *argv, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "daemon.log").read_text().splitlines() == [f"tick {i}" for i in range(40)] + ["daemon done"]


def test_damaged_newest_generation_falls_back_to_the_previous_one(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(TOOLS / "appender.py"), "200", "0.05"]
    proc = start_ckpt("run", "--job-id", "108", "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o", err=tmp_path / "e")
    wait_for(lambda: registered(runtime, "108"), 30, "the wrapper to register")
    time.sleep(0.5)
    assert run_ckpt("checkpoint", "--job-id", "108", env=env).returncode == 0
    time.sleep(0.5)
    assert run_ckpt("checkpoint", "--job-id", "108", "--final", env=env).returncode == 0
    assert proc.wait(timeout=30) == 75

    manifests = sorted((store / "108" / "main").glob("gen-*/manifest.json"))
    assert len(manifests) == 2
    old, new = (json.loads(m.read_text())["manifest"] for m in manifests)
    old_digests = {c[0] for i in old["images"] for c in i["chunks"]}
    only_new = next(c for i in new["images"] if i["name"].startswith("core-") for c in i["chunks"]
                    if c[0] not in old_digests)
    chunk = next((store / "108" / "chunks" / only_new[0][:2]).glob(only_new[0] + "*"))
    chunk.write_bytes(b"garbage" + chunk.read_bytes()[7:])

    bad = run_ckpt("verify", "--job-id", "108", env=env)
    assert bad.returncode == 65
    assert "checkpoint 2 image core-" in bad.stderr
    assert "is corrupt" in bad.stderr or "fails its checksum" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

    res = run_ckpt("run", "--job-id", "108", "--", *argv, env=env, cwd=work, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checkpoint 2 is damaged" in res.stderr
    assert "from checkpoint 1 taken" in res.stderr
    assert "inconsistent" not in res.stdout
    assert (work / "log.txt").read_text().splitlines() == [f"step {i}" for i in range(200)]


def _stopped_child(parent: int):
    """The pid of a stopped process whose parent is `parent`, or None."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
            if state == "T" and int(ppid) == parent:
                return int(entry)
    return None


def _criu_stopping_at_dump(tmp_path: Path, flag: Path) -> Path:
    """A `criu` that stops itself before a dump once `flag` exists (and runs the real one otherwise)."""
    script = tmp_path / "criu-stops"
    script.write_text(f"""#!/bin/sh
if [ "$1" = dump ] && [ -e '{flag}' ]; then kill -STOP $$; fi
exec '{criu_binary()}' "$@"
""")
    script.chmod(0o755)
    return script


def test_checkpointer_killed_midway_leaves_previous_checkpoint_usable(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    flag = tmp_path / "stop-at-dump"
    config = Path(env["CKPT_CONFIG"])
    stopping = _criu_stopping_at_dump(tmp_path, flag)
    config.write_text(json.dumps({**json.loads(config.read_text()), "criu": str(stopping)}) + "\n")
    argv = ["python3", str(TOOLS / "memtool.py"), "400", "5"]
    proc = start_ckpt("run", "--job-id", "109", "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o", err=tmp_path / "e")
    wait_for(lambda: (work / "ready").exists(), 60, "the tool to fill its memory")
    assert run_ckpt("checkpoint", "--job-id", "109", env=env, timeout=120).returncode == 0
    flag.touch()
    second = subprocess.Popen(__import__("ckpt_helpers").ckpt_cmd("checkpoint", "--job-id", "109"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # midway by an event, not by a guess of how long a dump takes: the second dump's CRIU stops itself before it
    # starts (the wrapper script below), then the checkpointer (`ckpt run`) and the tool die while it is stopped
    criu = wait_for(lambda: _stopped_child(proc.pid), 60, "the second checkpoint's CRIU to stop")
    try:
        assert list((store / "109" / "main").glob("gen-000002.partial-*"))
        kill_job(proc, runtime, "109")
    finally:
        flag.unlink()
        os.kill(criu, signal.SIGKILL)
    second.wait(timeout=60)

    assert [g["generation"] for g in generations(env, "109")] == [1]
    assert run_ckpt("verify", "--job-id", "109", env=env).returncode == 0
    (work / "mutate").touch()
    (work / "stop").touch()
    res = run_ckpt("run", "--job-id", "109", "--", *argv, env=env, cwd=work, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "from checkpoint 1 taken" in res.stderr
    assert res.stdout.startswith("checksum ")


def test_second_checkpoint_after_5_percent_change_stores_little(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(TOOLS / "memtool.py"), "256", "5"]
    proc = start_ckpt("run", "--job-id", "110", "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o", err=tmp_path / "e")
    wait_for(lambda: (work / "ready").exists(), 60, "the tool to fill its memory")
    assert run_ckpt("checkpoint", "--job-id", "110", env=env, timeout=120).returncode == 0
    (work / "mutate").touch()
    wait_for(lambda: (work / "mutated").exists(), 30, "the tool to change 5% of its memory")
    assert run_ckpt("checkpoint", "--job-id", "110", env=env, timeout=120).returncode == 0
    first, second = generations(env, "110")
    assert first["bytes_written"] > 256 << 20  # random memory: stored in full, uncompressed
    assert second["bytes_written"] < 0.15 * first["bytes_written"], (first, second)
    (work / "stop").touch()
    assert proc.wait(timeout=30) == 0
def test_random_page_changes_are_stored_as_page_deltas_and_a_damaged_base_falls_back(ck, tmp_path):
    env, store, runtime = ck
    config = Path(env["CKPT_CONFIG"])
    config.write_text(json.dumps({**json.loads(config.read_text()), "checkpoint": {"keep": 4}}) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["python3", str(TOOLS / "pagetool.py"), "256", "5"]
    proc = start_ckpt("run", "--job-id", "111", "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o", err=tmp_path / "e")
    wait_for(lambda: (work / "ready").exists(), 60, "the tool to fill its memory")
    assert run_ckpt("checkpoint", "--job-id", "111", env=env, timeout=120).returncode == 0
    (work / "mutate").touch()  # 5% of the 4 KiB pages, at random places: every 1 MiB window holds some
    wait_for(lambda: (work / "mutated").exists(), 30, "the tool to change 5% of its pages")
    assert run_ckpt("checkpoint", "--job-id", "111", env=env, timeout=120).returncode == 0
    assert run_ckpt("checkpoint", "--job-id", "111", "--final", env=env, timeout=120).returncode == 0
    assert proc.wait(timeout=30) == 75

    def manifest(n):
        return json.loads((store / "111" / "main" / f"gen-{n:06d}" / "manifest.json").read_text())["manifest"]

    first, second, third = manifest(1), manifest(2), manifest(3)
    assert first["stats"]["bytes_written"] > 256 << 20
    assert second["stats"]["bytes_written"] <= 0.10 * first["stats"]["bytes_written"], second["stats"]
    assert any("slicetable" in i for i in pages_images(second)) and any("slicetable" in i for i in pages_images(third))

    # a restore of the delta generation gives the tool exactly its memory back
    proc = start_ckpt("run", "--job-id", "111", "--", *argv, env=env, cwd=work, out=tmp_path / "o2",
                      err=tmp_path / "e2")
    assert page_tool_verdict(work) == "intact mutated=True"
    assert run_ckpt("checkpoint", "--job-id", "111", "--final", env=env, timeout=120).returncode == 0
    assert proc.wait(timeout=30) == 75
    assert "from checkpoint 3 taken" in (tmp_path / "e2").read_text()

    fourth = manifest(4)
    # a damaged slice table (format 3: a delta's slices are chunks of their own) is named by `ckpt verify`
    table = next(i["slicetable"]["chunks"][0][0] for i in pages_images(fourth) if "slicetable" in i)
    table_chunk = next((store / "111" / "chunks" / table[:2]).glob(table + "*"))
    intact = table_chunk.read_bytes()
    table_chunk.write_bytes(b"garbage" + intact[7:])
    bad = run_ckpt("verify", "--job-id", "111", env=env)
    assert bad.returncode == 65 and "checkpoint 4 image pages-" in bad.stderr and "slice table" in bad.stderr, \
        bad.stderr
    table_chunk.write_bytes(intact)
    assert run_ckpt("verify", "--job-id", "111", env=env).returncode == 0

    # damage a chunk the second checkpoint wrote (changed pages) that the third and the fourth still use: 4, 3 and 2
    # are damaged. (Chunks are named by content: the fourth may also write anew a chunk that the second wrote and the
    # third does not use, a few pages of a process back in the state they had at the second; not that one.)
    def digests(m):
        return {c[0] for i in pages_images(m) for c in i["chunks"]}

    in_all = (digests(second) & digests(third)) - digests(first)
    digest = next(c[0] for i in pages_images(fourth) for c in i["chunks"] if c[0] in in_all)
    chunk = next((store / "111" / "chunks" / digest[:2]).glob(digest + "*"))
    chunk.write_bytes(b"garbage" + chunk.read_bytes()[7:])
    bad = run_ckpt("verify", "--job-id", "111", env=env)
    assert bad.returncode == 65 and "checkpoint 4 image pages-" in bad.stderr, bad.stderr

    proc = start_ckpt("run", "--job-id", "111", "--", *argv, env=env, cwd=work, out=tmp_path / "o3",
                      err=tmp_path / "e3")
    (work / "mutate").touch()
    assert page_tool_verdict(work) == "intact mutated=True"
    (work / "stop").touch()
    assert proc.wait(timeout=60) == 0
    err = (tmp_path / "e3").read_text()
    assert all(f"checkpoint {n} is damaged" in err for n in (4, 3, 2)), err
    assert "from checkpoint 1 taken" in err


def test_registrations_of_wrappers_that_are_gone_are_ignored(tmp_path):
    """A wrapper killed outright (Slurm SIGKILLs what is left of a cancelled job) leaves its registration: the agent
    must not requeue that ended job on the next Spot notice, nor act on a pid the kernel gave to another process."""
    from ckpt_agent.checkpoint.runner import list_registrations, process_start_time, registration_dir

    d = tmp_path / "run"
    os.makedirs(registration_dir(str(d)))
    gone = subprocess.Popen(["true"])
    gone.wait()
    me, start = os.getpid(), process_start_time(os.getpid())
    regs = {"live": {"pid": me, "pid_start": start}, "old-format": {"pid": me},
            "dead": {"pid": gone.pid, "pid_start": 1}, "reused": {"pid": me, "pid_start": start - 1}}
    for job, reg in regs.items():
        with open(os.path.join(registration_dir(str(d)), f"{job}.main.json"), "w") as fh:
            json.dump({"job_id": job, **reg}, fh)
    open(os.path.join(registration_dir(str(d)), "dead.main.sock"), "w").close()
    assert sorted(r["job_id"] for r in list_registrations(str(d))) == ["live", "old-format"]
    # the registrations (and socket) of wrappers that are gone are removed, the live ones kept
    assert sorted(os.listdir(registration_dir(str(d)))) == ["live.main.json", "old-format.main.json"]


def test_a_fifo_or_huge_file_in_the_registration_directory_is_refused_not_waited_on(tmp_path):
    """The registration directory is world-writable (1777): a FIFO planted under a job's registration name must not
    hang `ckpt checkpoint` or the agent's notice handling, and a huge file is not read into memory."""
    from ckpt_agent.checkpoint.runner import (
        REGISTRATION_MAX_BYTES,
        find_registration,
        list_registrations,
        process_start_time,
        registration_dir,
    )

    d = tmp_path / "run"
    regdir = registration_dir(str(d))
    os.makedirs(regdir)
    os.mkfifo(os.path.join(regdir, "7.main.json"))
    with open(os.path.join(regdir, "8.main.json"), "wb") as fh:
        fh.truncate(REGISTRATION_MAX_BYTES + 1)
    with open(os.path.join(regdir, "9.main.json"), "w") as fh:
        json.dump({"job_id": "9", "pid": os.getpid(), "pid_start": process_start_time(os.getpid())}, fh)
    assert [r["job_id"] for r in list_registrations(str(d))] == ["9"]
    for job in ("7", "8"):
        with pytest.raises(errors.CkptError, match="registration"):
            find_registration(str(d), job, "main")
    assert find_registration(str(d), "9", "main")["job_id"] == "9"


_SWEEP_HOLD = '''"""Test hook (sitecustomize): once <hold>/armed exists, the chunk sweep waits for <hold>/go."""
import os
import time

try:
    from ckpt_agent.store import generations
except ImportError:  # the tool's own python
    generations = None

if generations is not None and os.environ.get("CKPT_TEST_SWEEP_HOLD"):
    _hold = os.environ["CKPT_TEST_SWEEP_HOLD"]
    _sweep = generations.CheckpointStore.sweep_chunks

    def sweep_chunks(self, job_id, **kw):
        if kw.get("locked"):  # the inner call, under the job lock
            return _sweep(self, job_id, **kw)
        if os.path.exists(os.path.join(_hold, "armed")):
            open(os.path.join(_hold, "started"), "w").close()
            deadline = time.monotonic() + 300
            while not os.path.exists(os.path.join(_hold, "go")) and time.monotonic() < deadline:
                time.sleep(0.05)
        out = _sweep(self, job_id, **kw)
        open(os.path.join(_hold, "swept"), "a").write(f"{out[0]}\\n")
        return out

    generations.CheckpointStore.sweep_chunks = sweep_chunks
'''


def test_a_final_checkpoint_replies_before_the_store_cleanup_and_the_wrapper_waits_for_it(ck, tmp_path):
    """The prune and chunk sweep after a final checkpoint are off the deadline path: `ckpt checkpoint --final`
    (and the agent's requeue after it) returns while the sweep is held; the wrapper exits 75 only once it ran."""
    env, store, runtime = ck
    hook, hold, work = tmp_path / "hook", tmp_path / "hold", tmp_path / "work"
    for d in (hook, hold, work):
        d.mkdir()
    (hook / "sitecustomize.py").write_text(_SWEEP_HOLD)
    env = dict(env, CKPT_TEST_SWEEP_HOLD=str(hold),
               PYTHONPATH=os.pathsep.join(p for p in (str(hook), str(REPO), env.get("PYTHONPATH", "")) if p))
    argv = ["python3", str(TOOLS / "memtool.py"), "64", "5"]
    proc = start_ckpt("run", "--job-id", "110", "--interval", "1000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o", err=tmp_path / "e")
    try:
        wait_for(lambda: (work / "ready").exists() and registered(runtime, "110"), 60, "the tool to fill memory")
        # generation 1's changed blocks are referenced by it alone: the final (3) prunes it (keep: 2)
        assert run_ckpt("checkpoint", "--job-id", "110", env=env).returncode == 0
        (work / "mutate").touch()
        wait_for((work / "mutated").exists, 60, "the tool to change its memory")
        before = len((hold / "swept").read_text().splitlines())
        assert run_ckpt("checkpoint", "--job-id", "110", env=env).returncode == 0
        # a periodic checkpoint sweeps before its reply
        assert len((hold / "swept").read_text().splitlines()) == before + 1 and not (hold / "started").exists()
        (hold / "armed").touch()
        final = run_ckpt("checkpoint", "--job-id", "110", "--final", env=env)
        assert final.returncode == 0, final.stderr
        wait_for((hold / "started").exists, 60, "the sweep after the final checkpoint's reply")
        assert proc.poll() is None, "the wrapper waits for the cleanup before it exits"
        swept_before = (hold / "swept").read_text().splitlines()
        (hold / "go").touch()
        assert proc.wait(timeout=60) == errors.EXIT_FINAL
        swept = (hold / "swept").read_text().splitlines()
        assert len(swept) == len(swept_before) + 1 and int(swept[-1]) > 0, swept
        assert [g["generation"] for g in generations(env, "110")] == [2, 3]
    finally:
        (hold / "go").touch()
        if proc.poll() is None:
            kill_job(proc, runtime, "110")
