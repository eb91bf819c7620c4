"""Holds MIB MiB of random memory; on `mutate` (a file appearing) rewrites PERCENT% of it in 1 MiB blocks."""
import os
import random
import sys
import time

mib, percent = int(sys.argv[1]), float(sys.argv[2])
block = 1 << 20
data = bytearray(os.urandom(mib * block))
open("ready", "w").close()
while not os.path.exists("mutate"):
    time.sleep(0.05)
rng = random.Random(7)
for b in rng.sample(range(mib), max(1, int(mib * percent / 100))):
    data[b * block:(b + 1) * block] = os.urandom(block)
open("mutated", "w").close()
while not os.path.exists("stop"):
    time.sleep(0.05)
print(f"checksum {sum(data[::4096])}", flush=True)
