"""Zero pages a restore may leave out and zero pages it must not (checkpoint/zeropages.py), in a parent and a child.

Each process holds four private mappings (MAP_PRIVATE, never MAP_SHARED), each REGION bytes:
- `anon`: anonymous, a pattern with its middle ZEROED bytes written back to zeros (whole 1 MiB windows of zeros:
  the store's all-zero chunk);
- `file`: a private mapping of `backing.bin` (in the job's directory, every byte 0xAB), whose middle is overwritten
  with zeros: copy-on-write pages of zeros over a file that is not zero; they must come back as zeros, not the file;
- `before`: anonymous, the parent's pattern, mapped before the fork: the child inherits it (copy-on-write) and writes
  zeros over all of it, the parent keeps its pattern;
- `after`: anonymous, zeros written by the parent before the fork; the child writes a pattern of its own over all of it.
Then `ready-<role>` appears. On `check`, each process writes `checked-<role>` (JSON): how many pages of each zero run
are resident (read from /proc/self/pagemap before any byte is read, since reading a zero page maps one), and whether
every mapping holds what it must. On `scribble`, each writes bytes of its own into its zero runs (the first MiB of
the zeroed middle of `anon`, and a byte every 64 pages of the other run) and then `scribbled-<role>`: after a
restore left those pages out, the next checkpoint must find them written. Both exit on `stop`."""
import ctypes
import json
import mmap
import os
import random
import struct
import time

REGION = 8 << 20
ZEROED = (REGION // 2, REGION // 2 + (4 << 20))  # the zeroed middle of `anon` and `file`
PAGE = mmap.PAGESIZE
PRIVATE_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def pattern(seed, size=REGION):
    return random.Random(seed).randbytes(size)


def address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def resident(m, start, end):
    """How many pages of m[start:end] are present (bit 63 of each /proc/self/pagemap word)."""
    first = (address(m) + start) // PAGE
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(first * 8)
        words = struct.unpack(f"<{(end - start) // PAGE}Q", fh.read((end - start) // PAGE * 8))
    return sum(w >> 63 for w in words)


def with_zeros(data, start, end):
    return data[:start] + bytes(end - start) + data[end:]


with open("backing.bin", "wb") as fh:
    fh.write(b"\xab" * REGION)
fd = os.open("backing.bin", os.O_RDONLY)
maps = {
    "anon": mmap.mmap(-1, REGION, flags=PRIVATE_ANON),
    "file": mmap.mmap(fd, REGION, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE),
    "before": mmap.mmap(-1, REGION, flags=PRIVATE_ANON),
    "after": mmap.mmap(-1, REGION, flags=PRIVATE_ANON),
}
os.close(fd)
for m in maps.values():  # residency page by page, also where THP is `always` (a fault would map 2 MiB at once)
    m.madvise(mmap.MADV_NOHUGEPAGE)
maps["anon"][:] = with_zeros(pattern(1), *ZEROED)
maps["file"][ZEROED[0]:ZEROED[1]] = bytes(ZEROED[1] - ZEROED[0])
maps["before"][:] = pattern(2)
maps["after"][:] = bytes(REGION)

role = "parent"
kid = os.fork()
if kid == 0:
    role = "child"
    maps["before"][:] = bytes(REGION)
    maps["after"][:] = pattern(3)

expected = {
    "anon": with_zeros(pattern(1), *ZEROED),
    "file": with_zeros(b"\xab" * REGION, *ZEROED),
    "before": pattern(2) if role == "parent" else bytes(REGION),
    "after": bytes(REGION) if role == "parent" else pattern(3),
}
zero_runs = {"anon": ZEROED, "file": ZEROED, ("after" if role == "parent" else "before"): (0, REGION)}
open(f"ready-{role}", "w").close()
while not os.path.exists("stop"):
    if os.path.exists("scribble") and not os.path.exists(f"scribbled-{role}"):
        mark = b"P" if role == "parent" else b"C"
        for k, (start, end) in zero_runs.items():
            if k == "anon":
                data = (mark * (1 << 20))[:min(1 << 20, end - start)]
                maps[k][start:start + len(data)] = data
                expected[k] = expected[k][:start] + data + expected[k][start + len(data):]
            elif k != "file":
                for at in range(start + 17, end, 64 * PAGE):
                    maps[k][at:at + 1] = mark
                    expected[k] = expected[k][:at] + mark + expected[k][at + 1:]
        open(f"scribbled-{role}", "w").close()
    if os.path.exists("check") and not os.path.exists(f"checked-{role}"):
        report = {"resident": {k: resident(maps[k], *run) for k, run in zero_runs.items()},
                  "pages": {k: (run[1] - run[0]) // PAGE for k, run in zero_runs.items()},
                  "differs": sorted(k for k, m in maps.items() if m[:] != expected[k])}
        with open(f"checked-{role}.tmp", "w") as fh:
            json.dump(report, fh)
        os.rename(f"checked-{role}.tmp", f"checked-{role}")
    time.sleep(0.05)
if kid:
    os.waitpid(kid, 0)
