"""`ckpt checkpoint`: checkpoint a job that `ckpt run` is running on this machine.

Prints the new generation on stdout. On stderr: live progress (bytes written to the store, rate, time left against
the previous checkpoint's size) while stderr is a terminal, and one summary line at the end in any case.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Any, Dict, Optional

from ckpt_agent.adapters import control
from ckpt_agent.checkpoint.progress import DirectoryGrowth, ProgressLine
from ckpt_agent.checkpoint.registry import find_registration
from ckpt_agent.commands._common import (
    add_config_args,
    add_job_args,
    job_id_from_env,
    load,
    seconds_arg,
)
from ckpt_agent.errors import PermissionDenied
from ckpt_agent.store import event_names as ev
from ckpt_agent.util.units import human_bytes
from ckpt_agent.util.usercreds import owner_of_path

HELP = "checkpoint a running job now (with --final: and stop it; the wrapper then exits 75)"
TICK = 0.5  # seconds between progress samples on a terminal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    add_config_args(parser)
    parser.add_argument("--final", action="store_true", help="stop the tool once the checkpoint is committed")
    parser.add_argument("--timeout", type=seconds_arg, metavar="SECONDS", help="give up on the dump after this long")


def _previous_size(job_dir: str, step: str) -> Optional[float]:
    """Bytes the step's last checkpoint wrote: the estimate of this one's (from the job's events file)."""
    import json

    last = None
    try:
        with open(os.path.join(job_dir, "events.jsonl"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if f'"{ev.CHECKPOINT_COMMITTED}"' in line:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("step") == step and record.get("bytes_written"):
                        last = float(record["bytes_written"])
    except OSError:
        return None
    return last


def _request(reg: Dict[str, Any], req: Dict[str, Any], job_id: str, step: str) -> Dict[str, Any]:
    try:
        return control.request(reg["socket"], req)
    except PermissionDenied:
        raise PermissionDenied(f"job {job_id} step {step} belongs to {owner_of_path(reg['socket'])}: "
                               f"only its owner or root may checkpoint it") from None


def main(args: argparse.Namespace) -> int:
    cfg = load(args)
    job_id = job_id_from_env(args.job_id)
    reg = find_registration(cfg.runtime_dir, job_id, args.name)
    req = {"op": "checkpoint", "final": args.final, "reason": "manual", "timeout": args.timeout}
    label = f"{'final ' if args.final else ''}checkpoint of job {job_id} step {args.name}"
    job_dir = os.path.join(str(reg.get("store") or cfg.store or ""), job_id)
    line = ProgressLine(sys.stderr, label, _previous_size(job_dir, args.name) if sys.stderr.isatty() else None)
    if line.tty and os.path.isdir(job_dir):
        growth = DirectoryGrowth(job_dir)
        out: Dict[str, Any] = {}

        def work() -> None:
            try:
                out["reply"] = _request(reg, req, job_id, args.name)
            except BaseException as e:  # handed to the main thread
                out["error"] = e

        worker = threading.Thread(target=work, name="checkpoint", daemon=True)
        worker.start()
        line.sample(0)
        while worker.is_alive():
            worker.join(TICK)
            line.sample(growth.grown())
        line.clear()
        if "error" in out:
            raise out["error"]
        reply = out["reply"]
    else:
        reply = _request(reg, req, job_id, args.name)
    result = control.raise_for_reply(reply)  # a failure is the one `ckpt: ...` line the CLI prints
    seconds = float(result.get("seconds") or 0)
    written = float(result.get("bytes_written") or 0)
    rate = f", {human_bytes(written / seconds)}/s" if seconds > 0 else ""
    line.done(f"{label}: generation {result['generation']}, {human_bytes(float(result.get('bytes_in') or 0))} "
              f"captured, {human_bytes(written)} written in {seconds:.1f} s{rate}")
    print(result["generation"])
    return 0
