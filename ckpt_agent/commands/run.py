"""`ckpt run`: run a tool so that it can be checkpointed, or resume it from its last checkpoint."""

from __future__ import annotations

import argparse
import logging
import os

from ..backends import choose_backend
from ..errors import UsageError
from ..runner import Runner, RunOptions
from ._common import add_config_args, add_job_args, job_id_from_env, load, make_engine, open_store
from ._observe import install_sinks

HELP = "run CMD checkpointed, or resume it from the job's last checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    add_config_args(parser)
    parser.add_argument("--interval", type=float, metavar="SECONDS",
                        help="seconds between periodic checkpoints (default: config, 900)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")


def main(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("nothing to run: ckpt run [options] -- CMD [ARGS...]")
    if not args.verbose:
        # our output shares the job's output file: only warnings and errors go there
        logging.getLogger().setLevel(logging.WARNING)
    cfg = load(args)
    job_id = job_id_from_env(args.job_id)
    interval = args.interval if args.interval is not None else cfg.checkpoint.interval
    if interval <= 0:
        raise UsageError(f"--interval must be > 0, got {interval:g}")
    store = open_store(cfg, args)
    install_sinks(cfg)
    backend = choose_backend(lambda: make_engine(cfg, store), cfg.socket_path)
    opts = RunOptions(job_id=job_id, step=args.name, argv=cmd, interval=interval, runtime_dir=cfg.runtime_dir,
                      cwd=os.getcwd())
    return Runner(opts, store, backend).run()
