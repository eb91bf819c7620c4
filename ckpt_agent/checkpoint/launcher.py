"""Start a tool in a new PID namespace under nsinit, with the given stdio and status pipes.

The namespace is why a restore never collides with PIDs on the new machine: CRIU recreates the namespace, so the
tool's own PIDs come back unchanged whatever runs on the host. It is created here, not with the `unshare` binary,
so nothing but the tool ever writes to the job's output.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import List, Mapping, Optional, Sequence, Tuple

from ckpt_agent.errors import LaunchError
from ckpt_agent.util.usercreds import Creds, join_cgroups_of
from ckpt_agent.util.usercreds import fs_identity as user_fs

CLONE_NEWPID = 0x20000000
PR_SET_CHILD_SUBREAPER = 36
NSINIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nsinit.py")
STATUS_FD = 3  # where nsinit finds the status pipe

_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper() -> None:
    """Orphans of our children (the namespace init once its launcher exits) are reparented to us, not to pid 1."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise LaunchError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def launch(
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    stdout_fd: int,
    stderr_fd: int,
    status_fd: int,
    creds: Optional[Creds] = None,
    cgroup_pid: Optional[int] = None,
) -> int:
    """Fork a launcher that unshares a PID namespace and forks nsinit as its pid 1; return nsinit's host pid.

    A wrapper running as root is a child subreaper, so nsinit becomes its child when the launcher exits. The node
    agent launching for an ordinary user passes the user's `creds` (nsinit drops to them before it execs the
    tool) and the wrapper's pid as `cgroup_pid` (the job's cgroups, so Slurm limits, accounts and kills the tool
    with the job).
    """
    pid_r, pid_w = os.pipe()
    launcher = os.fork()
    if launcher == 0:  # the launcher: only async-signal-safe-ish work, then _exit
        try:
            os.close(pid_r)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            os.dup2(status_fd, STATUS_FD)
            if cgroup_pid:
                join_cgroups_of(cgroup_pid)
            if _libc.unshare(CLONE_NEWPID) != 0:
                os.write(2, f"ckpt: unshare(CLONE_NEWPID) failed: {os.strerror(ctypes.get_errno())}\n".encode())
                os._exit(1)
            init = os.fork()
            if init == 0:
                os.closerange(STATUS_FD + 1, 65536)  # no descriptor of the wrapper leaks into the job
                as_user = []
                if creds is not None:  # nsinit stays root (see nsinit.py); the tool runs as the job's user
                    groups = ",".join(str(g) for g in creds.groups)
                    as_user = ["--as", f"{creds.uid}:{creds.gid}:{groups}"]
                    os.chdir("/")
                    with user_fs(creds):
                        os.chdir(cwd)  # checked with the user's rights: root never enters a directory for them
                else:
                    os.chdir(cwd)
                os.execve(sys.executable, nsinit_command(STATUS_FD, as_user, argv), dict(env))
            os.write(pid_w, str(init).encode())
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(pid_w)
    with os.fdopen(pid_r, "rb") as fh:
        data = fh.read()
    _, wstatus = os.waitpid(launcher, 0)
    if not data or os.waitstatus_to_exitcode(wstatus) != 0:
        raise LaunchError("could not start the tool in a new PID namespace (needs root or CAP_SYS_ADMIN)")
    return int(data)


def nsinit_command(status_fd: int, as_user: Sequence[str], argv: Sequence[str]) -> List[str]:
    """The namespace init's command line. Its shape is how the agent recognises one of our inits among a node's
    processes (`nsinit_runs_as`): keep both here."""
    return [sys.executable, "-I", "-S", NSINIT, str(status_fd), *as_user, "--", *argv]


def nsinit_runs_as(cmdline: Sequence[bytes]) -> Tuple[bool, Optional[int]]:
    """(is one of our namespace inits, the uid it runs its job as: None for a root job) from /proc/PID/cmdline."""
    if len(cmdline) < 6 or cmdline[1:3] != [b"-I", b"-S"] or os.path.basename(cmdline[3]) != b"nsinit.py":
        return False, None
    if not cmdline[4].isdigit():
        return False, None
    rest = list(cmdline[5:])
    if rest[:1] == [b"--as"]:
        try:
            return rest[2:3] == [b"--"], int(rest[1].split(b":")[0])
        except (IndexError, ValueError):
            return False, None
    return rest[:1] == [b"--"], None
