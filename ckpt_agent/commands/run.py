"""`ckpt run`: run a tool so that it can be checkpointed, or resume it from its last checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ckpt_agent.checkpoint.backends import choose_backend
from ckpt_agent.checkpoint.planner import budget_seconds
from ckpt_agent.checkpoint.runner import Runner, RunOptions, enclosing_step
from ckpt_agent.commands._common import (
    add_config_args,
    add_job_args,
    job_id_from_env,
    load,
    make_engine,
    open_store,
    seconds_arg,
)
from ckpt_agent.commands._observe import install_sinks
from ckpt_agent.errors import UsageError
from ckpt_agent.store.generations import Signer

log = logging.getLogger(__name__)

HELP = "run CMD checkpointed, or resume it from the job's last checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    add_config_args(parser)
    parser.add_argument("--interval", type=seconds_arg, metavar="SECONDS",
                        help="seconds between periodic checkpoints (default: config, 900)")
    parser.add_argument("--transparent", action="store_true",
                        help="say so on stderr and in the job's events: the cluster's job_submit plugin runs whole "
                             "batch scripts this way (transparent checkpointing)")
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
    job_id = job_id_from_env(args.job_id)
    outer = enclosing_step(job_id)
    if outer is not None:
        # inside a checkpointed tree of this job already: that checkpoint covers this tool too; never two
        log.debug("job %s: step %s runs inside checkpointed step %s; running it plainly", job_id, args.name, outer)
        return _exec(cmd)
    cfg = load(args)
    interval = args.interval if args.interval is not None else cfg.checkpoint.interval
    if interval <= 0:
        raise UsageError(f"--interval must be > 0, got {interval:g}")
    store = open_store(cfg, args)
    if os.geteuid() == 0:  # root checkpoints its own jobs: they are signed too, with a key created at first use
        store.signer = Signer.ensure(cfg.agent.key_file, cfg.source)
    install_sinks(cfg)
    backend = choose_backend(lambda: make_engine(cfg, store), cfg.socket_path)
    opts = RunOptions(job_id=job_id, step=args.name, argv=cmd, interval=interval, runtime_dir=cfg.runtime_dir,
                      cwd=os.getcwd(), mode="transparent" if args.transparent else "explicit",
                      agent_socket=cfg.socket_path, recent=cfg.checkpoint.recent_periodic,
                      budget=budget_seconds({"deadline_margin": cfg.agent.deadline_margin,
                                             "poll_interval": cfg.agent.poll_interval}))
    return Runner(opts, store, backend).run()


def _exec(cmd) -> int:
    """Replace this process with the tool, as the shell would have run it (exit 127/126 like a shell)."""
    try:
        os.execvp(cmd[0], cmd)
    except FileNotFoundError:
        print(f"ckpt: {cmd[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as e:
        print(f"ckpt: {cmd[0]}: cannot run: {e.strerror}", file=sys.stderr)
        return 126
    return 70  # not reached: execvp returns only by raising
