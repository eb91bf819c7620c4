"""`ckpt`: one command with a subcommand per job. Each subcommand lives in `ckpt_agent.commands.<name>` and
provides HELP, add_arguments(parser) and main(args) -> exit code.

User errors print one line `ckpt: <message>` and exit with the error's documented code; a traceback is shown only
with --verbose (or CKPT_DEBUG=1).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from . import __version__
from .errors import EXIT_INTERNAL, CkptError

COMMANDS = [
    "run",
    "checkpoint",
    "list",
    "verify",
    "agent",
    "validate",
    "render",
    "upload",
    "gc",
    "report",
    "prices",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt", description="Checkpoint/restore for batch jobs on EC2 Spot.")
    parser.add_argument("--version", action="version", version=f"ckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
