"""`ckpt checkpoint`: checkpoint a job that `ckpt run` is running on this machine."""

from __future__ import annotations

import argparse

from .. import control
from ..errors import PermissionDenied
from ..runner import find_registration
from ..usercreds import owner_of_path
from ._common import add_config_args, add_job_args, job_id_from_env, load, seconds_arg

HELP = "checkpoint a running job now (with --final: and stop it; the wrapper then exits 75)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser)
    add_config_args(parser)
    parser.add_argument("--final", action="store_true", help="stop the tool once the checkpoint is committed")
    parser.add_argument("--timeout", type=seconds_arg, metavar="SECONDS", help="give up on the dump after this long")


def main(args: argparse.Namespace) -> int:
    cfg = load(args)
    job_id = job_id_from_env(args.job_id)
    reg = find_registration(cfg.runtime_dir, job_id, args.name)
    try:
        reply = control.request(reg["socket"], {"op": "checkpoint", "final": args.final, "reason": "manual",
                                                "timeout": args.timeout})
    except PermissionDenied:
        raise PermissionDenied(f"job {job_id} step {args.name} belongs to {owner_of_path(reg['socket'])}: "
                               f"only its owner or root may checkpoint it") from None
    print(control.raise_for_reply(reply)["generation"])
    return 0
