"""A big job on this machine (issue 14): a 12 GiB job on a 24 GiB machine, through the product's path.

Steps, each of which must succeed (the bench exits 1 otherwise):
  1. `ckpt run -- memhog.py MIB random 5 --digest` in an empty working directory; wait until its memory is filled;
  2. `ckpt checkpoint`: a full checkpoint (the command returns once the generation is committed);
  3. the workload rewrites 5% of its 4 KiB pages at random places and records the sha256 of its whole memory;
  4. `ckpt checkpoint --final`: a page-granular incremental that stops the job (`ckpt run` exits 75);
  5. `ckpt run` again restores it (the `restored` event); the restored workload prints the sha256 of its memory,
     which must equal the one recorded before the final checkpoint;
  6. `dd if=<random data> of=<store fs> bs=1M conv=fsync` of as many bytes as the first checkpoint read, in the
     same run, to the same file system: every time is printed next to it as a ratio.

Memory: the job (MIB) plus CRIU's working set must fit. The bench skips, with one line saying so, when
MemAvailable is below MIB + --headroom-gib (default 4 GiB): on a smaller machine `make bench BIG_JOB_GIB=2`.
Run as root (CRIU): `python bench/big_job_bench.py --gib 12`. The store lives under --dir (default
/var/tmp/ckpt-bench, the real disk), removed afterwards.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from checkpoint_bench import (  # noqa: E402
    MIB,
    bench_store,
    ckpt,
    cold_restore,
    log,
    manifest,
    mem_available,
    model_check,
    stop_workload,
    store_filesystem,
    sync,
    wait_for,
    write_kind,  # noqa: E402
)
from vmhost import held_page_reporting  # noqa: E402

from ckpt_agent.checkpoint import planner  # noqa: E402

GIB = 1 << 30
CHANGED_PERCENT = 5


class StepFailed(Exception):
    pass


def run_big_job(base: Path, store: Path, env: Dict[str, str], mib: int) -> Dict[str, Any]:
    job = f"bench-big-{mib}m-{os.getpid()}"
    work = base / f"work-{job}"
    work.mkdir()
    out_path = base / f"{job}.out"
    out = open(out_path, "ab")
    argv = [sys.executable, str(BENCH / "memhog.py"), str(mib), "random", str(CHANGED_PERCENT), "--digest"]
    r: Dict[str, Any] = {"mib": mib}
    proc = None
    try:
        log(f"{mib} MiB: starting the workload under ckpt run")
        t = time.monotonic()
        proc = subprocess.Popen(ckpt("run", "--job-id", job, "--interval", "1000000", "--", *argv), env=env,
                                cwd=work, stdout=out, stderr=out, start_new_session=True)
        wait_for(lambda: (work / "ready").exists() or proc.poll() is not None, 120 + mib / 20, "the workload")
        if proc.poll() is not None:
            raise StepFailed(f"start: ckpt run exited with {proc.returncode}; see {out_path}")
        r["fill"] = time.monotonic() - t

        log(f"{mib} MiB: full checkpoint")
        sync()
        t = time.monotonic()
        done = subprocess.run(ckpt("checkpoint", "--job-id", job), env=env, stdout=subprocess.DEVNULL)
        r["full"] = time.monotonic() - t
        if done.returncode != 0:
            raise StepFailed(f"full checkpoint: ckpt checkpoint exited with {done.returncode}; see {out_path}")
        r["stats1"] = manifest(store, job, 1)["stats"]

        (work / "mutate").touch()
        wait_for(lambda: (work / "mutated").exists() or proc.poll() is not None, 300 + mib / 10,
                 f"the workload to change {CHANGED_PERCENT}% of its pages")
        if proc.poll() is not None:
            raise StepFailed(f"change: ckpt run exited with {proc.returncode}; see {out_path}")
        r["digest"] = (work / "mutated").read_text().strip()

        log(f"{mib} MiB: final checkpoint after a {CHANGED_PERCENT}% change")
        sync()
        t = time.monotonic()
        done = subprocess.run(ckpt("checkpoint", "--job-id", job, "--final"), env=env, stdout=subprocess.DEVNULL)
        r["final"] = time.monotonic() - t
        if done.returncode != 0:
            raise StepFailed(f"final checkpoint: ckpt checkpoint exited with {done.returncode}; see {out_path}")
        r["stats2"] = manifest(store, job, 2)["stats"]
        code = proc.wait(timeout=120)
        if code != 75:
            raise StepFailed(f"final checkpoint: ckpt run exited with {code}, expected 75; see {out_path}")

        log(f"{mib} MiB: restore")
        proc, restored, r["restore_wall"] = cold_restore(store, job, argv, env, work, out, 600 + mib / 10)
        if restored is None:
            raise StepFailed(f"restore: ckpt run exited with {proc.returncode} instead of restoring; see {out_path}")
        r["restore"] = restored["seconds"]
        (work / "stop").touch()
        code = proc.wait(timeout=300 + mib / 10)
        if code != 0:
            raise StepFailed(f"restore: the restored workload exited with {code}; see {out_path}")
        out.flush()
        seen = [line.split()[1] for line in out_path.read_text(errors="replace").splitlines()
                if line.startswith("sha256 ")]
        if seen != [r["digest"]]:
            raise StepFailed(f"restore: memory after restore has sha256 {seen or 'none printed'}, before the final "
                             f"checkpoint {r['digest']}")
        log(f"{mib} MiB: memory after restore matches (sha256 {r['digest'][:16]}...)")
    finally:
        stop_workload(proc, work)
        out.close()
        shutil.rmtree(store / job, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    r["dd"] = time_dd_random(store / "dd.bin", math.ceil(r["stats1"]["bytes_in"] / MIB))
    return r


def time_dd_random(dest: Path, mib: int) -> float:
    """Wall time of `dd bs=1M conv=fsync` writing `mib` MiB of random data to `dest`'s file system. The source is
    one GiB of random data in tmpfs, fed to dd as often as needed (a 12 GiB source would not fit beside the
    rest): to the disk that is random data like the job's, read at memory speed."""
    log(f"dd of {mib} MiB to the store's file system")
    fd, src = tempfile.mkstemp(prefix="ckpt-bench-dd.", dir="/dev/shm")
    os.close(fd)
    try:
        part = min(mib, 1024)
        write_kind(Path(src), "random", part * MIB)
        dest.unlink(missing_ok=True)
        sync()
        t = time.monotonic()
        feed = subprocess.Popen(["sh", "-c", f'for i in $(seq {math.ceil(mib / part)}); do cat "$1"; done', "feed",
                                 src], stdout=subprocess.PIPE)
        subprocess.run(["dd", f"of={dest}", "bs=1M", f"count={mib}", "iflag=fullblock", "conv=fsync"],
                       stdin=feed.stdout, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elapsed = time.monotonic() - t
        feed.stdout.close()
        feed.kill()
        feed.wait()
        return elapsed
    finally:
        os.unlink(src)
        dest.unlink(missing_ok=True)


def report(r: Dict[str, Any]) -> None:
    s1, s2 = r["stats1"], r["stats2"]
    raw, dd = s1["bytes_in"], r["dd"]
    print()
    print(f"big job: {r['mib'] / 1024:g} GiB of random memory, {CHANGED_PERCENT}% of its 4 KiB pages changed at "
          f"random places; dd conv=fsync of {raw / GIB:.2f} GiB to the same file system: {dd:.1f} s "
          f"({raw / dd / 1e6:.0f} MB/s)")
    rows = [
        ("full checkpoint", r["full"], s1["bytes_written"], s1["frozen_seconds"]),
        ("final checkpoint after the change", r["final"], s2["bytes_written"], s2["frozen_seconds"]),
        ("restore (engine)", r["restore"], None, None),
    ]
    print(f"  {'step':<36} {'s':>8} {'/dd':>7} {'stored GiB':>11} {'frozen s':>9}")
    for name, secs, stored, frozen in rows:
        print(f"  {name:<36} {secs:>8.1f} {secs / dd:>6.2f}x "
              + (f"{stored / GIB:>11.2f} {frozen:>9.1f}" if stored is not None else f"{'':>11} {'':>9}"))
    print(f"  final / full: time {r['final'] / r['full']:.2f}x, stored bytes "
          f"{s2['bytes_written'] / max(1, s1['bytes_written']):.3f}x")
    store_mb_s = raw / dd / 1e6
    print(f"  `ckpt plan`'s model (planner.final_seconds, its default rates: dump {planner.DEFAULT_DUMP_GIB_S:g} "
          f"GiB/s, scan {planner.DEFAULT_SCAN_GIB_S:g} GiB/s; the store at dd's {store_mb_s:.0f} MB/s):")
    print("    full checkpoint: " + model_check(
        memory_bytes=raw, changed_bytes=raw, write_bytes=s1["bytes_written"], store_mb_s=store_mb_s, tracked=False,
        rates={}, measured=r["full"]))
    print("    final checkpoint: " + model_check(
        memory_bytes=s2["bytes_in"], changed_bytes=s2["bytes_new"], write_bytes=s2["bytes_written"],
        store_mb_s=store_mb_s, tracked=bool(s2.get("pages_unchanged")), rates={}, measured=r["final"]))
    print(f"  memory after restore equals memory before the final checkpoint: yes (sha256 {r['digest'][:16]}...)")
    print("big job: all steps succeeded")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=12, help="the job's memory in GiB (default 12)")
    p.add_argument("--headroom-gib", type=float, default=4,
                   help="memory needed beyond the job's for CRIU and the rest of the machine (default 4)")
    p.add_argument("--dir", default="/var/tmp/ckpt-bench", help="working directory on the disk under test")
    p.add_argument("--leave-page-reporting", action="store_true",
                   help="on a VM with free page reporting, measure with the host's page faults (vmhost.py)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("big_job_bench: needs root (CRIU)", file=sys.stderr)
        return 2
    mib = int(args.gib * 1024)
    need = mib * MIB + int(args.headroom_gib * GIB)
    if args.gib <= 0:
        print("big_job_bench: skipped (--gib 0)")
        return 0
    if mem_available() < need:
        print(f"big_job_bench: skipped: a {args.gib:g} GiB job needs {need / GIB:.1f} GiB of available memory, "
              f"this machine has {mem_available() / GIB:.1f} GiB (set BIG_JOB_GIB smaller, or 0 to skip)")
        return 0
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="big-", dir=base))
    store, env = bench_store(base)
    free = shutil.disk_usage(store).free
    if free < 3 * mib * MIB:
        print(f"big_job_bench: skipped: needs {3 * mib * MIB / GIB:.0f} GiB free on {store}'s file system, "
              f"has {free / GIB:.0f} GiB")
        shutil.rmtree(base, ignore_errors=True)
        return 0
    log(f"store {store} on {store_filesystem(store)}; CPUs {os.cpu_count()}; memory available "
        f"{mem_available() / GIB:.1f} GiB")
    try:
        with held_page_reporting(min(need, max(mem_available() - GIB, 0)), log, hold=not args.leave_page_reporting):
            r = run_big_job(base, store, env, mib)
    except (StepFailed, RuntimeError) as e:
        print(f"big_job_bench: FAILED: {e}", file=sys.stderr)
        for out in base.glob("*.out"):  # the wrapper's and the workload's output, before it is removed
            print(f"--- last lines of {out.name}:", file=sys.stderr)
            print("\n".join(out.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
