"""The small init that runs as pid 1 of a job's own PID namespace, with the tool as its child.

Run as `python -I -S nsinit.py STATUS_FD [--as UID:GID:GROUPS] -- CMD [ARGS...]` (standard library only, so it
starts fast and stays small in every checkpoint). Why it exists:
- pid 1 of a namespace ignores signals it has no handler for, so a tool running as pid 1 would ignore Slurm's
  SIGTERM; this init forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGCONT to every process of
  the job (kill(-1) inside the namespace).
- orphans of tools that fork or daemonize are reparented to it and reaped; the job ends when all its processes
  have ended, not when the first one exits.
- for an ordinary user's job (--as), the init becomes the user but keeps CAP_SYS_ADMIN, and the tool runs as the
  user without any capability. CRIU's parasite mounts a procfs for the job's PID namespace from inside the init,
  which a task without CAP_SYS_ADMIN may not do ("can't dump unprivileged task whose /proc doesn't belong to
  it"); the init must still have the job's uids, so that CRIU can read every task's limits (prlimit) as the
  user where root lacks CAP_SYS_RESOURCE. The tool cannot use the init's capability: a process may not ptrace
  or read the memory of one with more capabilities, and the init runs only this file.
- it reports the tool's exit status (128+N for signal N) on STATUS_FD, a pipe to the `ckpt run` wrapper that
  survives checkpoint/restore; the wrapper need not be the parent of a restored tree.
"""

import ctypes
import os
import signal
import sys

PR_SET_KEEPCAPS = 8
CAP_SYS_ADMIN = 21
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def set_caps(libc, caps):
    """Set this process's effective and permitted capabilities to exactly `caps` (inheritable: none)."""
    bits = 0
    for cap in caps:
        bits |= 1 << cap
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(bits & 0xFFFFFFFF, bits & 0xFFFFFFFF, 0), _CapData(bits >> 32, bits >> 32, 0))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def become_user(uid, gid, groups):
    """Take the job's uids and gids for good, keeping only CAP_SYS_ADMIN (see the module docstring)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    set_caps(libc, [CAP_SYS_ADMIN])
    libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    return libc

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCONT,
)


def forward(signum, _frame):
    try:
        os.kill(-1, signum)
    except OSError:
        pass


def main() -> None:
    status_fd = int(sys.argv[1])
    rest = sys.argv[2:]
    user = None
    if rest[:1] == ["--as"] and len(rest) > 1:
        uid, gid, groups = rest[1].split(":")
        user = (int(uid), int(gid), [int(g) for g in groups.split(",") if g])
        rest = rest[2:]
    if rest[:1] != ["--"] or len(rest) < 2:
        sys.stderr.write("nsinit: usage: nsinit.py STATUS_FD [--as UID:GID:GROUPS] -- CMD [ARGS...]\n")
        os._exit(2)
    argv = rest[1:]
    libc = become_user(*user) if user is not None else None
    try:
        os.setsid()  # a session leader of its own, so CRIU never needs --shell-job
    except OSError:
        pass
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        try:
            if libc is not None:
                set_caps(libc, [])  # the tool gets no capability at all
            os.execvp(argv[0], argv)
        except OSError as e:
            sys.stderr.write(f"ckpt: cannot run {argv[0]}: {e.strerror}\n")
            sys.stderr.flush()
            os._exit(127 if isinstance(e, FileNotFoundError) else 126)
    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = None
    while True:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        if pid == child:
            status = wstatus
    if status is None:
        code = 1
    elif os.WIFSIGNALED(status):
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
    try:
        os.write(status_fd, f"{code}\n".encode())
    except OSError:
        pass
    os._exit(code)


if __name__ == "__main__":
    main()
