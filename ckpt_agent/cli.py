"""`ckpt`: one command with a subcommand per job. Each subcommand lives in `ckpt_agent.commands.<name>` and
provides HELP, add_arguments(parser) and main(args) -> exit code.

Only the chosen subcommand's module is imported (all of them take ~0.3 s, which every `ckpt checkpoint` would
pay); the `ckpt --help` listing comes from the COMMANDS table, whose texts repeat each module's HELP.

User errors print one line `ckpt: <message>` and exit with the error's documented code; a traceback is shown only
with --verbose (or CKPT_DEBUG=1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Iterable, List, Optional

from ckpt_agent import __version__
from ckpt_agent.errors import EXIT_INTERNAL, EXIT_USAGE, CkptError

# subcommand -> its module's HELP, for the `ckpt --help` listing without importing every module
COMMANDS = {
    "run": "run CMD checkpointed, or resume it from the job's last checkpoint",
    "checkpoint": "checkpoint a running job now (with --final: and stop it; the wrapper then exits 75)",
    "list": "list the checkpoints in the store",
    "verify": "verify the newest checkpoint of a job (exit 0 when intact, 65 naming the damaged part otherwise)",
    "agent": "run the node agent: Spot notices -> final checkpoints -> drain -> requeue; privileged service for jobs",
    "validate": "check a site file (the admin YAML) and list every problem",
    "render": "render the ParallelCluster config and node files from a site file",
    "upload": "upload the bootstrap bundle to S3 and print the pcluster create-cluster command",
    "gc": "remove checkpoints of finished jobs and superseded generations (head node, from a systemd timer)",
    "report": "report run segments, checkpoints, work lost, net vs wall-clock runtime and Spot savings per job",
    "prices": "show the Spot/On-Demand price table, or refresh it from AWS with --update",
    "plan": "predict each queue's final-checkpoint time against the Spot notice, and the FSx throughput that would fit",
}


def chosen_command(argv: List[str]) -> Optional[str]:
    """The subcommand named on the command line: the first word that is not a top-level option (none takes a value)."""
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


class OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes as one line `ckpt: <where>: <what>` and exit 2 (argparse prints usage and a second
    line); subcommand parsers inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        where = self.prog[len("ckpt"):].strip()
        self.exit(EXIT_USAGE, f"ckpt: {where + ': ' if where else ''}{message} (see '{self.prog} --help')\n")


def build_parser(commands: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The parser, with the arguments of `commands` (default: every subcommand; their modules are imported)."""
    load = set(COMMANDS if commands is None else commands)
    parser = OneLineParser(prog="ckpt", description="Checkpoint/restore for batch jobs on EC2 Spot.")
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, text in COMMANDS.items():
        if name not in load:
            sub.add_parser(name, help=text, description=text)  # listed in --help; not the one being parsed
            continue
        module = importlib.import_module(f"ckpt_agent.commands.{name.replace('-', '_')}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_main=module.main)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    chosen = chosen_command(argv)
    parser = build_parser([chosen] if chosen else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, printed), --help or --version
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    verbose = args.verbose or os.environ.get("CKPT_DEBUG") == "1"
    if getattr(args, "_configure_logging", True):
        setup_logging(verbose)
    try:
        return int(args._main(args) or 0)
    except CkptError as e:
        if verbose:
            logging.getLogger("ckpt").exception("failed")
        print(f"ckpt: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ckpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so in one line, keep the traceback for --verbose
        if verbose:
            raise
        print(f"ckpt: internal error: {type(e).__name__}: {e} (run with --verbose for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
