"""The small init that runs as pid 1 of a job's own PID namespace, with the tool as its child.

Run as `python -I -S nsinit.py STATUS_FD -- CMD [ARGS...]` (standard library only, so it starts fast and stays
small in every checkpoint). Why it exists:
- pid 1 of a namespace ignores signals it has no handler for, so a tool running as pid 1 would ignore Slurm's
  SIGTERM; this init forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGCONT to every process of
  the job (kill(-1) inside the namespace).
- orphans of tools that fork or daemonize are reparented to it and reaped; the job ends when all its processes
  have ended, not when the first one exits.
- it reports the tool's exit status (128+N for signal N) on STATUS_FD, a pipe to the `ckpt run` wrapper that
  survives checkpoint/restore; the wrapper need not be the parent of a restored tree.
"""

import os
import signal
import sys

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
    if sys.argv[2] != "--" or len(sys.argv) < 4:
        sys.stderr.write("nsinit: usage: nsinit.py STATUS_FD -- CMD [ARGS...]\n")
        os._exit(2)
    argv = sys.argv[3:]
    try:
        os.setsid()  # a session leader of its own, so CRIU never needs --shell-job
    except OSError:
        pass
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        try:
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
