"""A benchmark workload: holds MIB MiB of memory of one KIND, then waits, changing PERCENT% of it on request.

Usage: memhog.py MIB KIND PERCENT [--digest]    (KIND: random | text | zeros)

Files in the working directory drive it (they survive checkpoint/restore, unlike a signal in flight):
  ready    written once the memory is filled
  mutate   when it appears, PERCENT% of the 4 KiB pages, at random places, are rewritten with new data of the same
           kind (zeros: with random data, since new zeros would change nothing), then `mutated` is written
  mutate2  after that, when it appears: another PERCENT% rewritten the same way, then `mutated2` is written (the
           change before the first checkpoint after a restore)
  stop     when it appears, the workload prints a checksum and exits 0
With --digest, `mutated` holds the sha256 of the whole memory after the change, and `stop` prints it again
(`sha256 HEX`) from the memory as it is then: after a checkpoint and restore, the two must be equal.

Kinds:
  random  incompressible (os.urandom)
  text    netlist-like SPICE/Verilog text, ~3x compressible with zstd -1: 1 MiB blocks copied from a 32 MiB pool of
          generated lines at random offsets, so every chunk is different (no accidental deduplication)
  zeros   zero-filled pages that are touched (written), so they are real pages CRIU dumps, not the shared zero page
"""

import ctypes
import hashlib
import os
import random
import sys
import time

BLOCK = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
POOL_MIB = 32  # unique text the blocks are cut from; large enough that zstd's 1 MiB window sees no repeats


def netlist_pool(rng: random.Random, mib: int) -> bytes:
    cells = ("nch", "pch", "nch_lvt", "pch_hvt", "res", "cap")
    parts = []
    size = 0
    n = 0
    while size < mib * BLOCK:
        n += 1
        kind = rng.random()
        if kind < 0.7:
            line = (f"M{n} net_{rng.randrange(1 << 20)} net_{rng.randrange(1 << 20)} net_{rng.randrange(1 << 20)} "
                    f"vss {rng.choice(cells)} W={rng.randrange(1, 400) / 100:.2f}u L={rng.randrange(1, 40) / 100:.2f}u "
                    f"m={rng.randrange(1, 8)}\n")
        elif kind < 0.9:
            line = f"R{n} net_{rng.randrange(1 << 20)} net_{rng.randrange(1 << 20)} {rng.randrange(1, 99999)}\n"
        else:
            line = (f"  u_{rng.randrange(1 << 16)}/U{n} (.A(n{rng.randrange(1 << 20)}), .B(n{rng.randrange(1 << 20)}), "
                    f".Y(n{rng.randrange(1 << 20)}));\n")
        parts.append(line)
        size += len(line)
    return "".join(parts).encode()


def fill(data: bytearray, blocks, kind: str, rng: random.Random, pool: bytes) -> None:
    for b in blocks:
        start = b * BLOCK
        if kind == "random" or (kind == "zeros" and pool is None):
            data[start:start + BLOCK] = os.urandom(BLOCK)
        elif kind == "text":
            off = rng.randrange(len(pool) - BLOCK)
            data[start:start + BLOCK] = pool[off:off + BLOCK]


def change(data: bytearray, kind: str, percent: float, rng: random.Random, pool: bytes) -> None:
    """Rewrite percent% of the whole pages (malloc puts a header before the buffer: from its first page boundary),
    at random places."""
    start = -ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data)) % PAGE
    npages = len(data) // PAGE - 1
    for p in rng.sample(range(npages), max(1, int(npages * percent / 100))):
        at = start + p * PAGE
        if kind == "text":
            off = rng.randrange(len(pool) - PAGE)
            data[at:at + PAGE] = pool[off:off + PAGE]
        else:
            data[at:at + PAGE] = os.urandom(PAGE)


def main() -> None:
    mib, kind, percent = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    digest = "--digest" in sys.argv[4:]
    if kind not in ("random", "text", "zeros"):
        sys.exit(f"memhog: unknown kind {kind!r}")
    rng = random.Random(1)
    pool = netlist_pool(rng, POOL_MIB) if kind == "text" else b""
    data = bytearray(mib * BLOCK)  # calloc: untouched pages would be skipped by CRIU, so all kinds write every page
    if kind == "zeros":
        data[::PAGE] = bytes(len(range(0, len(data), PAGE)))
    else:
        fill(data, range(mib), kind, rng, pool)
    open("ready", "w").close()
    for trigger, done in (("mutate", "mutated"), ("mutate2", "mutated2")):
        while not os.path.exists(trigger):
            if os.path.exists("stop"):
                break
            time.sleep(0.05)
        else:
            change(data, kind, percent, rng, pool)
            with open(f"{done}.tmp", "w") as fh:
                fh.write(hashlib.sha256(data).hexdigest() if digest else "")
            os.rename(f"{done}.tmp", done)  # whole when it appears
    while not os.path.exists("stop"):
        time.sleep(0.05)
    print(f"checksum {sum(data[::PAGE])}", flush=True)
    if digest:
        print(f"sha256 {hashlib.sha256(data).hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
