"""Whether chunks are compressed when the store slows down (issue 14: codecs chosen per chunk against the store's
measured write bandwidth), measured with the engine's own chunk code.

A store's zstd level is chosen once, from a probe of the file system when the job starts (chunks.choose_level); on
this 2-vCPU machine's disk no level keeps up, so chunks are stored raw. A final checkpoint may meet a slower store:
FSx shared by every node reclaimed at the same moment. Then each store's own write pace (chunks.WritePace) makes it
compress the chunks where that is sooner (chunks.paced_level). No file system here can be slowed that way, so this
bench holds the chunk writes back itself: a token bucket around each chunk file's write lets the store take RATE
MB/s in all (simulated: the bytes still go to the disk under --dir, then the writer sleeps until the bucket allows
them). The probe runs first, unheld, as at a job's start.

For each kind of data (netlist-like text, random) and each rate (MB/s; 0: not held back), MIB MiB are stored
through the engine's worker count with paced compression off (paced_level returns None: the store of before) and
on, alternating (off, on, on, off; --repeat times, four times as often for a store not held back, whose runs take
a tenth of a second and would be judged on noise), and the bench prints the medians' ratio on/off of time and bytes:
below 1 where the store is slow, never above 1.05 (the target: compressing never costs a checkpoint time).
Run `python bench/codec_bench.py [--mib 256] [--rates 100,400,1000,0] [--repeat 3]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from memhog import POOL_MIB, netlist_pool  # noqa: E402

from ckpt_agent.store import chunks as chunkstore  # noqa: E402

MIB = 1 << 20
MAX_SLOWER = 1.05  # paced on / off: compressing must not cost a checkpoint time (noise allowed)
ORDER = ("off", "on", "on", "off")  # alternating runs (ABBA): a drift of the machine falls on both
UNHELD_ROUNDS = 4  # a store not held back takes 256 MiB in 0.1-0.2 s: more runs, so that noise does not decide


class HeldStore:
    """Holds every chunk file's write back to `rate` bytes/s in all (0: not at all): a token bucket shared by the
    workers, as a file system shared by many nodes gives each one its share."""

    def __init__(self, rate: float):
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def write_all(self, fd: int, data) -> None:
        chunkstore.write_all(fd, data)
        if not self.rate:
            return
        with self._lock:
            now = time.perf_counter()
            self._free_at = max(now, self._free_at) + len(data) / self.rate
            wait = self._free_at - now
        time.sleep(wait)


def blocks_of(kind: str, mib: int):
    rng = random.Random(2)
    if kind == "random":
        return [os.urandom(MIB) for _ in range(mib)]
    pool = netlist_pool(rng, POOL_MIB)  # 1 MiB blocks cut at random places, as bench/memhog.py's text
    return [pool[o:o + MIB] for o in (rng.randrange(len(pool) - MIB) for _ in range(mib))]


def store_once(base: str, blocks, paced: bool, held: HeldStore) -> tuple:
    root = tempfile.mkdtemp(prefix="codec.", dir=base)
    real_paced_level = chunkstore.paced_level
    if not paced:
        chunkstore.paced_level = lambda *_args: None
    try:
        store = chunkstore.ChunkStore(root, "zstd", writer=held.write_all)
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(chunkstore.WORKERS) as pool:
            results = list(pool.map(store.put, blocks))
        seconds = time.perf_counter() - t
        written = sum(stats.bytes_written for _ref, stats in results)
        compressed = sum(ref.codec == chunkstore.CODEC_ZSTD for ref, _stats in results)
        return seconds, written, compressed, store.level
    finally:
        chunkstore.paced_level = real_paced_level
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256, help="MiB stored per run (default 256)")
    p.add_argument("--rates", default="100,400,1000,0", help="MB/s the store takes in all; 0: not held back")
    p.add_argument("--kinds", default="text,random")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="rounds of off, on, on, off (default 3)")
    p.add_argument("--dir", default="/var/tmp/ckpt-bench", help="working directory on the disk under test")
    args = p.parse_args(argv)
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        print(f"codec_bench: --rates: not numbers: {args.rates!r}", file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    base = tempfile.mkdtemp(prefix="codec-bench.", dir=args.dir)
    speeds, ratios = chunkstore.codec_speeds(), chunkstore.codec_ratios()
    probed = chunkstore.store_bandwidth(base)  # unheld, as at a job's start
    print(f"codec bench, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {chunkstore.WORKERS} workers, "
          f"{args.mib} MiB a run; the store's probe: {probed / 1e6 if probed else 0:.0f} MB/s, zstd level "
          f"{chunkstore.choose_level(probed, speeds)}; zstd per core on netlist text: "
          + ", ".join(f"level {lv} {speeds[lv] / 1e6:.0f} MB/s ratio {ratios[lv]:.2f}"
                      for lv in chunkstore.ZSTD_LEVELS))
    misses = 0
    try:
        for kind in args.kinds.split(","):
            blocks = blocks_of(kind, args.mib)
            for rate in rates:
                held = HeldStore(rate * 1e6)
                runs = {"off": [], "on": []}
                for mode in ORDER * (max(1, args.repeat) * (1 if rate else UNHELD_ROUNDS)):
                    runs[mode].append(store_once(base, blocks, paced=mode == "on", held=held))
                med = {m: (statistics.median(r[0] for r in runs[m]), statistics.median(r[1] for r in runs[m]),
                           statistics.median(r[2] for r in runs[m])) for m in runs}
                time_ratio = med["on"][0] / med["off"][0]
                bytes_ratio = med["on"][1] / med["off"][1]
                verdict = "ok" if time_ratio <= MAX_SLOWER else "MISS"
                misses += verdict != "ok"
                where = f"held to {rate:g} MB/s" if rate else "not held back"
                print(f"  {kind:6} store {where:>20}: paced off {med['off'][0]:.2f} s, on {med['on'][0]:.2f} s "
                      f"({med['on'][2]:.0f} of {args.mib} chunks compressed): time {time_ratio:.2f}x, bytes "
                      f"{bytes_ratio:.2f}x (target: time <= {MAX_SLOWER}x) {verdict}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
