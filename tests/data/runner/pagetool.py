"""Holds MIB MiB of seeded random memory. On `mutate` (a file appearing) rewrites PERCENT% of its 4 KiB pages at
random places and fills a new 1 MiB buffer (a mapping that did not exist at the previous checkpoint); on `check`
writes `checked`: "intact" when its memory equals what the seeds say it must hold (rebuilt independently of the
memory under test), else "differs"; exits on `stop`."""
import ctypes
import os
import random
import sys
import time

mib, percent = int(sys.argv[1]), float(sys.argv[2])
PAGE = 4096
npages = mib * (1 << 20) // PAGE


def fill():
    rng = random.Random(1)
    return bytearray(b"".join(rng.randbytes(1 << 20) for _ in range(mib)))


def mutate(buf, start):
    """Rewrite whole pages: `start` is the offset of the buffer's first page boundary (malloc adds a header)."""
    rng = random.Random(2)
    for p in rng.sample(range(npages - 1), int(npages * percent / 100)):
        buf[start + p * PAGE:start + (p + 1) * PAGE] = rng.randbytes(PAGE)


def grown():
    return bytearray(random.Random(3).randbytes(1 << 20))


data = fill()
aligned = -ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data)) % PAGE
mutated = False
extra = bytearray()
open("ready", "w").close()
while not os.path.exists("stop"):
    if not mutated and os.path.exists("mutate"):
        mutate(data, aligned)
        extra = grown()
        mutated = True
        open("mutated", "w").close()
    if os.path.exists("check"):
        expected = fill()
        if mutated:
            mutate(expected, aligned)
        verdict = "intact" if expected == data and extra == (grown() if mutated else bytearray()) else "differs"
        del expected
        with open("checked.tmp", "w") as fh:
            fh.write(f"{verdict} mutated={mutated}\n")
        os.unlink("check")
        os.rename("checked.tmp", "checked")
    time.sleep(0.05)
