"""Holds two anonymous mappings with seeded random data: `huge`, advised MADV_HUGEPAGE, SPAN MiB long (default MIB) with
MIB MiB of data (half at its start, half at its end; the rest never touched), and `small`, 8 MiB advised
MADV_NOHUGEPAGE and filled; each starts 1 MiB past a 2 MiB boundary. On `report` (a file appearing) writes `reported`
as JSON: for each mapping its address, its AnonHugePages (kB) and VmFlags from /proc/self/smaps, and whether its data
equals what the seed says it must be (rebuilt independently of the memory under test). It only reads its mappings, so
a report after a restore sees them as the restore left them. Exits on `stop`.

Usage: hugetool.py MIB [SPAN]"""
import ctypes
import json
import mmap
import os
import random
import sys
import time

MIB = 1 << 20
data_mib = int(sys.argv[1])
span_mib = int(sys.argv[2]) if len(sys.argv) > 2 else data_mib
# mapping -> (its length, its advice, its seed, the (offset, length) parts that hold data)
LAYOUT = {
    "huge": (span_mib * MIB, mmap.MADV_HUGEPAGE, 1,
             [(0, data_mib // 2 * MIB), ((span_mib - data_mib // 2) * MIB, data_mib // 2 * MIB)]),
    "small": (8 * MIB, mmap.MADV_NOHUGEPAGE, 2, [(0, 8 * MIB)]),
}


def content(name: str):
    """(offset, bytes) of each part of the mapping that holds data."""
    _, _, seed, parts = LAYOUT[name]
    rng = random.Random(seed)
    return [(off, b"".join(rng.randbytes(MIB) for _ in range(n // MIB))) for off, n in parts]


libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
HUGE = 2 * MIB


def mapping(name: str) -> int:
    """The mapping's address: it starts 1 MiB past a 2 MiB boundary, so only the 2 MiB-aligned ranges inside it can be
    huge, and keeping them huge needs every move of it to keep its address modulo 2 MiB (not just its alignment)."""
    size, advice, _, _ = LAYOUT[name]
    base = libc.mmap(None, size + HUGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    start = base + (MIB - base) % HUGE
    if start > base:
        libc.munmap(base, start - base)
    libc.munmap(start + size, base + size + HUGE - start - size)
    if libc.madvise(start, size, advice):
        raise OSError(ctypes.get_errno(), "madvise")
    for off, data in content(name):
        ctypes.memmove(start + off, data, len(data))
    return start


def smaps_of(address: int) -> dict:
    """The AnonHugePages and VmFlags of the mapping that holds `address`."""
    found, out = False, {}
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
            elif found and head == "AnonHugePages:":
                out["anon_huge_kb"] = int(line.split()[1])
            elif found and head == "VmFlags:":
                out["flags"] = line.split()[1:]
    return out


addresses = {name: mapping(name) for name in LAYOUT}
open("ready", "w").close()
while not os.path.exists("stop"):
    if os.path.exists("report"):
        report = {k: {**smaps_of(addresses[k]), "address": addresses[k],
                      "intact": all(ctypes.string_at(addresses[k] + off, len(data)) == data
                                    for off, data in content(k))}
                  for k in LAYOUT}
        with open("reported.tmp", "w") as fh:
            json.dump(report, fh)
        os.unlink("report")
        os.rename("reported.tmp", "reported")
    time.sleep(0.05)
