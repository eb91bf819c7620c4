"""Helpers shared by the subcommands: job ids, config, store and engine wiring (the only place adapters meet)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional

from ckpt_agent.errors import UsageError
from ckpt_agent.node.config import AgentConfig, load_agent_config, require_store
from ckpt_agent.store.layout import check_name
from ckpt_agent.util.units import check_seconds

if TYPE_CHECKING:  # imported by the commands that use them: `ckpt checkpoint` only talks to a wrapper, and starts
    from ckpt_agent.checkpoint.engine import Engine  # faster without the store's and CRIU's modules
    from ckpt_agent.store.generations import CheckpointStore


def add_config_args(parser: argparse.ArgumentParser, store: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="agent.yaml (default: $CKPT_CONFIG, /etc/ckpt-agent/agent.yaml)")
    if store:
        parser.add_argument("--store", metavar="DIR", help="checkpoint store root (default: $CKPT_STORE, config)")


def seconds_arg(text: str) -> float:
    """argparse type: a finite number of seconds, > 0 and at most a year (nan, inf and 1e300 refused)."""
    try:
        return check_seconds(text, "seconds")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def name_arg(kind: str):
    """argparse type: a job id or step name as the store accepts it (no path tricks, at most 128 characters)."""
    def check(text: str) -> str:
        try:
            return check_name(kind, text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    check.__name__ = kind  # argparse names the type in its messages
    return check


def add_job_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--job-id", metavar="ID", required=required, type=name_arg("job id"),
                        help="job id (default: $SLURM_JOB_ID; array tasks: "
                             "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})")
    parser.add_argument("--name", metavar="STEP", default="main", type=name_arg("step name"),
                        help="step name within the job (default: main)")


def job_id_from_env(explicit: Optional[str]) -> str:
    if explicit is not None:
        return check_name("job id", explicit)
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return check_name("job id", f"{array_job}_{task}")
    if os.environ.get("SLURM_JOB_ID"):
        return check_name("job id", os.environ["SLURM_JOB_ID"])
    raise UsageError("no job id: pass --job-id ID or run inside a Slurm job ($SLURM_JOB_ID)")


def load(args: argparse.Namespace) -> AgentConfig:
    return load_agent_config(getattr(args, "config", None))


def open_store(cfg: AgentConfig, args: argparse.Namespace) -> CheckpointStore:
    from ckpt_agent.store.generations import CheckpointStore, Signer  # noqa: PLC0415 - see TYPE_CHECKING above

    root = require_store(cfg, getattr(args, "store", None))
    return CheckpointStore(root, Signer.from_file(cfg.agent.key_file))


def make_engine(cfg: AgentConfig, store: CheckpointStore) -> Engine:
    from ckpt_agent.adapters.criu import Criu  # noqa: PLC0415 - see TYPE_CHECKING above
    from ckpt_agent.checkpoint.engine import Engine

    criu = Criu(cfg.criu if os.path.sep in cfg.criu else _find_criu(cfg.criu))
    criu.require_version()
    return Engine(criu, store, cfg.checkpoint)


def _find_criu(name: str) -> str:
    """criu on PATH, else where install-criu.sh puts it (/usr/local/sbin is not on every user's PATH)."""
    import shutil

    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin") or name


def load_site_or_print(path: str, stream=None) -> Optional[Dict[str, Any]]:
    """The validated site file; None after printing every problem, one a line (stderr by default), as `ckpt
    validate` lists them: the caller then exits 2."""
    from ckpt_agent.site.schema import SiteInvalid, load_site

    try:
        return load_site(path)
    except SiteInvalid as e:
        for problem in e.problems:
            print(problem, file=stream or sys.stderr)
        return None
