"""A parent and a child over a copy of the same 8 MiB buffer, for dirty tracking across fork() (soft-dirty bits are
copied by fork, adapters/softdirty.py). The parent fills its buffer and forks child 1, which overwrites its copy with
a pattern of its own; then `ready` appears. On `swap`, child 1 exits and the parent forks child 2 under child 1's pid
(ns_last_pid: the job runs in a pid namespace of its own); child 2 never writes its copy, which holds the parent's
pattern; `swapped` appears, holding "same-pid" or "other-pid". On `check`, the child writes `checked`: "intact" when
its buffer holds the pattern it must, else "differs". Everything exits on `stop`."""
import os
import random
import signal
import sys
import time

SIZE = 8 << 20


def pattern(seed):
    return random.Random(seed).randbytes(SIZE)


def child(buf, expected):
    while True:
        if os.path.exists(f"bye-{os.getpid()}") or os.path.exists("stop"):
            os._exit(0)
        if os.path.exists("check"):
            verdict = "intact" if buf == expected else "differs"
            with open("checked.tmp", "w") as fh:
                fh.write(f"{verdict} pid={os.getpid()}\n")
            os.unlink("check")
            os.rename("checked.tmp", "checked")
        time.sleep(0.05)


buf = bytearray(pattern(10))  # the parent's pattern, written before any checkpoint and never again
first = os.fork()
if first == 0:
    buf[:] = pattern(11)  # child 1's own pages (copy-on-write)
    child(buf, pattern(11))
open("ready", "w").close()
kid, swapped = first, False
while not os.path.exists("stop"):
    if not swapped and os.path.exists("swap"):
        swapped = True
        open(f"bye-{first}", "w").close()
        os.waitpid(first, 0)
        os.unlink(f"bye-{first}")  # child 2 gets the same pid
        with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
            fh.write(str(first - 1))
        kid = os.fork()
        if kid == 0:
            child(buf, pattern(10))
        with open("swapped.tmp", "w") as fh:
            fh.write("same-pid\n" if kid == first else "other-pid\n")
        os.rename("swapped.tmp", "swapped")
    time.sleep(0.05)
os.kill(kid, signal.SIGTERM)
os.waitpid(kid, 0)
sys.exit(0)
