"""The guard of one checkpoint: it undoes a dead checkpointer's freeze, so a killed wrapper never leaves the tool
stopped.

Run as `python -I -S dumpguard.py FD INIT_PID PID_NS STAGING_DIR` (standard library only, so it starts fast) by
the engine just before `criu dump`, in a session of its own: it outlives the wrapper (or agent) that started it.
FD is the read end of a pipe whose write end the checkpointer holds and passes on to CRIU, so the guard sees
end-of-file only once both the checkpointer and CRIU are gone: never while CRIU still holds the tree.

The checkpointer writes one byte on the pipe when it is done with the tree:
  b"R": the tree runs again (or was never stopped): the guard exits and does nothing;
  b"K": a final checkpoint is committed: should the checkpointer die before it kills the tree, the guard kills it
        (the tool must not run on past a checkpoint its next segment will resume from).
Before that it may write b"H<pid>,<pid>;": the host pids of the processes the job had stopped itself (CRIU recorded
them stopped), which the engine does not resume either (the last such message counts).
End-of-file without b"R" means the checkpointer died mid-checkpoint (CRIU's --leave-stopped left the tree
stopped): the guard sends SIGCONT to every process of the job's PID namespace but the held ones (or SIGKILL to
every one after b"K") and removes the staging directory of the images, which lives in RAM when it is under
/dev/shm. The PID namespace's identity (the link /proc/PID/ns/pid) is checked first, so a recycled pid is never
signalled.
"""

import os
import shutil
import signal
import sys


def namespace_pids(pid_ns):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == pid_ns:
                out.append(int(name))
        except OSError:
            continue
    return out


def parse(buf):
    """(the last verdict byte or b"", the pids of the last whole hold message) of what the checkpointer wrote."""
    verdict, held, i = b"", set(), 0
    while i < len(buf):
        if buf[i:i + 1] == b"H":
            end = buf.find(b";", i)
            if end < 0:  # not whole (yet)
                break
            held = {int(p) for p in buf[i + 1:end].split(b",") if p.isdigit()}
            i = end + 1
        else:
            verdict = buf[i:i + 1]
            i += 1
    return verdict, held


def read_verdict(fd):
    """(verdict, held pids), once the checkpointer said b"R" or both it and CRIU are gone."""
    buf = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not data:
            return parse(buf)
        buf += data
        if parse(buf)[0] == b"R":
            return parse(buf)


def main():
    fd, init_pid, pid_ns, staging = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    verdict, held = read_verdict(fd)
    if verdict == b"R":
        return
    signum = signal.SIGKILL if verdict == b"K" else signal.SIGCONT
    try:
        alive = os.readlink(f"/proc/{init_pid}/ns/pid") == pid_ns
    except OSError:
        alive = False
    if alive:
        for pid in namespace_pids(pid_ns):
            if signum == signal.SIGCONT and pid in held:
                continue
            try:
                os.kill(pid, signum)
            except OSError:
                pass
    if staging:
        shutil.rmtree(staging, ignore_errors=True)
    sys.stderr.write(f"ckpt dumpguard: checkpointer of pid {init_pid} died; "
                     f"{'killed' if verdict == b'K' else 'resumed'} the tree, removed {staging}\n")


if __name__ == "__main__":
    main()
