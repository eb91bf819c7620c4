"""The one way this package runs other programs: argv lists, a timeout, allowed exit codes, one error type."""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ckpt_agent.errors import CommandError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 60  # long enough for scontrol/sacct on a loaded controller, short enough to notice a hang


@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    timeout: Optional[float] = DEFAULT_TIMEOUT_SECONDS,
    ok_codes: Sequence[int] = (0,),
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    input: Optional[str] = None,
    pass_fds: Sequence[int] = (),
) -> Result:
    """Run argv to completion and return its output; raise CommandError on a disallowed exit code or timeout."""
    argv = [str(a) for a in argv]
    log.debug("running %s", argv)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            pass_fds=tuple(pass_fds),
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(argv, 127, "", f"{argv[0]}: command not found") from e
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise CommandError(argv, -1, stderr, f"{argv[0]} timed out after {timeout:g} s") from e
    if proc.returncode not in ok_codes:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)
