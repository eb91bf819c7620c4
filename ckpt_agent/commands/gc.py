"""`ckpt gc [--config FILE] [--store DIR] [--grace SECONDS] [--dry-run]`: remove checkpoints nobody needs any more.

Run by the head node's systemd timer (ckpt-gc.timer). Exit codes: 0 done (also when another gc run holds the lock:
this one does nothing), 74 some removals failed (listed), 76 Slurm could not be asked (nothing removed), 78
configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

from ckpt_agent.adapters.slurm import Slurm
from ckpt_agent.commands._common import add_config_args, load, open_store
from ckpt_agent.errors import EXIT_STORE, StoreError, UsageError
from ckpt_agent.headnode.gc import (
    DryRunActuator,
    GarbageCollector,
    GcLock,
    Policy,
    RemoveActuator,
    summary,
)

HELP = "remove checkpoints of finished jobs and superseded generations (head node, from a systemd timer)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--grace", metavar="SECONDS", type=int,
                        help="keep a finished job's checkpoints this long after it ended (default: config gc.grace)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")


def main(args: argparse.Namespace) -> int:
    if args.grace is not None and args.grace < 0:
        raise UsageError(f"--grace {args.grace}: must be >= 0 seconds")
    cfg = load(args)
    store = open_store(cfg, args)
    if not os.path.isdir(store.root):
        raise StoreError(f"checkpoint store {store.root} does not exist or is not a directory")
    policy = Policy.from_config(cfg, grace=args.grace)
    lock = GcLock(os.path.join(cfg.runtime_dir, "gc.lock"))
    if not lock.acquire():
        print(f"ckpt gc: another gc run holds {lock.path}; nothing done", file=sys.stderr)
        return 0
    try:
        if not args.dry_run:  # this node's staging images of checkpointers that died (RAM in /dev/shm)
            from ckpt_agent.checkpoint.engine import STAGING_BASES, sweep_staging

            extra = () if cfg.checkpoint.staging_dir == "auto" else (cfg.checkpoint.staging_dir,)
            for path in sweep_staging(STAGING_BASES + extra):
                print(f"removed {path}: staging images of a checkpointer that died")
        actuator = DryRunActuator() if args.dry_run else RemoveActuator()
        out = GarbageCollector(store, Slurm.from_config(cfg), policy, actuator).run()
    finally:
        lock.release()
    for what, why in out.skipped:
        print(f"skipped {what}: {why}")
    for err in out.errors:
        print(f"ckpt gc: could not remove {err}", file=sys.stderr)
    print(summary(out, args.dry_run))
    return EXIT_STORE if out.errors else 0
