"""The error hierarchy and the exit codes the `ckpt` command documents.

Every error a user can cause or meet in operation is a CkptError subclass; the CLI prints its message as one line
and exits with its `exit_code`. Codes follow sysexits.h where one fits, so that they stay clear of the small codes
tools commonly use. The tool's own exit status (0-255, 128+N for signal N) passes through `ckpt run` unchanged.
"""

from __future__ import annotations

EXIT_USAGE = 2  # bad command line, or `ckpt validate` found problems in a site file
EXIT_DAMAGED = 65  # a checkpoint is damaged or tampered with and no good generation is left
EXIT_NOT_FOUND = 66  # no such job, step or checkpoint
EXIT_CRIU = 69  # CRIU is missing, too old, or a dump/restore failed
EXIT_INTERNAL = 70  # a bug: an unexpected exception (traceback with --verbose)
EXIT_LAUNCH = 71  # the tool could not be started (fork, PID namespace, subreaper: sysexits' EX_OSERR)
EXIT_BUSY = 73  # the job step is already running under another live `ckpt run` (here or on another node)
EXIT_STORE = 74  # the checkpoint store cannot be read or written
EXIT_FINAL = 75  # the tool was stopped by a final checkpoint: run the same command again to resume
EXIT_SLURM = 76  # Slurm could not be asked or refused a command
EXIT_PERMISSION = 77  # the agent refused: not the job's owner, or a checkpoint not signed by the agent
EXIT_CONFIG = 78  # a configuration file is missing, malformed or invalid
EXIT_AGENT = 79  # the node agent cannot be reached
EXIT_AWS = 80  # an AWS API call failed (upload, prices, report metrics, instance metadata)


class CkptError(Exception):
    """Base of all errors the CLI reports as one line."""

    exit_code = EXIT_INTERNAL


class UsageError(CkptError):
    exit_code = EXIT_USAGE


class ConfigError(CkptError):
    exit_code = EXIT_CONFIG


class NotFoundError(CkptError):
    exit_code = EXIT_NOT_FOUND


class CommandError(CkptError):
    """A subprocess failed: carries the command, its exit code and the tail of its stderr. The adapter that ran it
    turns it into the error of its kind (CriuError, SlurmError, ...); one that reaches the CLI is a bug (70)."""

    def __init__(self, argv, returncode, stderr="", message=""):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr or ""
        tail = self.stderr.strip().splitlines()[-1:] if self.stderr.strip() else []
        detail = message or f"{self.argv[0]} exited with {returncode}"
        if tail:
            detail += f": {tail[0]}"
        super().__init__(detail)


class CriuError(CkptError):
    exit_code = EXIT_CRIU


class IncompatibleCpuError(CriuError):
    """CRIU's CPU check refused a restore: this machine's CPU lacks features the checkpointed tool uses. `kind`
    carries the distinction through the agent's socket (control.py)."""

    kind = "incompatible_cpu"


class LaunchError(CkptError):
    """The tool could not be started: no new PID namespace (needs root or CAP_SYS_ADMIN), no subreaper."""

    exit_code = EXIT_LAUNCH


class StoreError(CkptError):
    exit_code = EXIT_STORE


class AlreadyRunning(CkptError):
    """A second `ckpt run` for a job step whose wrapper is alive: refused before it touches anything."""

    exit_code = EXIT_BUSY


class DamagedCheckpointError(StoreError):
    exit_code = EXIT_DAMAGED


class NewerFormatError(DamagedCheckpointError):
    """A manifest of a format a newer agent writes: unreadable here, but not damaged. A restore passes over it as
    over a damaged one; nothing it references is ever swept as unreferenced (a rolling upgrade keeps its chunks)."""


class SlurmError(CkptError):
    exit_code = EXIT_SLURM




class PermissionDenied(CkptError):
    exit_code = EXIT_PERMISSION


class AgentUnreachable(CkptError):
    exit_code = EXIT_AGENT


class AwsError(CkptError):
    exit_code = EXIT_AWS


class ImdsError(AwsError):
    """The instance metadata service cannot be asked or answered nonsense (the node agent retries)."""


def _owners() -> dict:
    """Each documented code and the one class that owns it (defines `exit_code` in its own body)."""
    owners, todo = {}, list(CkptError.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ == __name__ and "exit_code" in vars(cls):
            owners[cls.exit_code] = cls
    return owners


def error_for_exit_code(code: int, message: str) -> CkptError:
    """The error a remote side (the node agent, a wrapper's control socket) reported by its exit code, as the
    subclass that documents that code; a code no subclass owns is reported as a bug (70)."""
    return _owners().get(code, CkptError)(message)
