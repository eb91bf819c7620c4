"""What verifying reused chunks costs a checkpoint (issue 11, defect 2), measured with the engine's own chunk code.

A checkpoint that reuses a chunk the job stored before checks it first when the chunk is picked for verification: a
periodic checkpoint re-reads the 1/SCRUB_SLICES of them whose digest falls in its slice; a final one checks every
reused chunk by its stat when this process wrote or read it before (chunks.py, CHECKED), re-reading it otherwise
(engine.reuse_checks). For each kind of data (random = stored raw, text = netlist-like,
stored zstd-compressed where a CPU is free):
  1. store FILE (MIB MiB) into an empty chunk store: the first checkpoint, every chunk written;
  2. store it again with every chunk known and none verified: what an incremental checkpoint of unchanged memory
     cost before (hashing only);
  3. again, re-reading the periodic slice (1/SCRUB_SLICES of the chunks);
  4. again as a final checkpoint does in the process that wrote the chunks: every chunk checked by its stat, the
     chunk files dropped from the page cache with posix_fadvise (cold: a chunk re-read comes from the disk);
  5. again as a final checkpoint in a process that never wrote nor read them: every chunk re-read, with the chunk
     files in the page cache (warm: the node that wrote them) and dropped from it (cold);
and prints each time with its ratio to step 2 and to step 1. The store lives under --dir (default
/var/tmp/ckpt-bench, the real disk). Run `python bench/verify_bench.py [--mib 512] [--kinds random,text]`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from memhog import POOL_MIB, netlist_pool  # noqa: E402

from ckpt_agent.checkpoint.engine import SCRUB_SLICES, reuse_checks  # noqa: E402
from ckpt_agent.store import chunks as chunkstore  # noqa: E402

MIB = 1 << 20


def make_data(path: Path, kind: str, mib: int) -> None:
    with open(path, "wb") as fh:
        if kind == "random":
            for _ in range(mib):
                fh.write(os.urandom(MIB))
        else:
            pool = netlist_pool(random.Random(7), POOL_MIB)
            left = mib * MIB
            while left:
                part = pool[: min(left, len(pool))]
                fh.write(part)
                left -= len(part)


def drop_cache(root: str) -> None:
    for _digest, path in chunkstore.iter_chunk_files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_store(root: str, data: Path, known, verify, pool, scrub=None) -> tuple:
    chunks = chunkstore.ChunkStore(root, "zstd", known)
    chunks.verify_reused = verify
    chunks.scrub = scrub
    t0 = time.monotonic()
    refs, stats, _ = chunkstore.store_file(chunks, str(data), pool)
    chunkstore.syncfs(root)
    return time.monotonic() - t0, refs, stats


def bench_kind(base: str, kind: str, mib: int) -> None:
    work = tempfile.mkdtemp(prefix=f"verify-{kind}.", dir=base)
    try:
        data = Path(work) / "data"
        make_data(data, kind, mib)
        root = os.path.join(work, "chunks")
        with concurrent.futures.ThreadPoolExecutor(chunkstore.WORKERS) as pool:
            t_first, refs, _ = timed_store(root, data, None, None, pool)
            known = {r.digest: r.codec for r in refs}
            t_reuse, _, _ = timed_store(root, data, known, None, pool)
            in_slice = lambda d: int(d[:2], 16) % SCRUB_SLICES == 0  # noqa: E731
            t_slice, _, s_slice = timed_store(root, data, known, in_slice, pool)
            drop_cache(root)
            final_verify, final_scrub = reuse_checks(0, final=True)
            t_final, _, s_final = timed_store(root, data, known, final_verify, pool, scrub=final_scrub)
            chunkstore.CHECKED = chunkstore.CheckedFiles()  # a process that never wrote nor read these chunks
            t_warm, _, s_all = timed_store(root, data, known, lambda _d: True, pool)
            chunkstore.CHECKED = chunkstore.CheckedFiles()
            drop_cache(root)
            t_cold, _, _ = timed_store(root, data, known, lambda _d: True, pool)
        codecs = sorted({r.codec for r in refs})
        print(f"{kind} {mib} MiB ({len(refs)} chunks, codecs {','.join(codecs)}):")
        print(f"  first checkpoint, all chunks written      {t_first:7.2f} s")
        print(f"  reuse, no verification (before)           {t_reuse:7.2f} s")
        for label, t, n in ((f"periodic: re-read the 1/{SCRUB_SLICES} slice", t_slice, s_slice.chunks_verified),
                            ("final: every chunk by its stat, cold", t_final, s_final.chunks_verified),
                            ("final, none checked before: all re-read, warm", t_warm, s_all.chunks_verified),
                            ("final, none checked before: all re-read, cold", t_cold, s_all.chunks_verified)):
            print(f"  {label:<46}  {t:7.2f} s  {t / t_reuse:5.2f}x reuse  {t / t_first:5.2f}x first  "
                  f"({n} chunks checked)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--kinds", default="random,text")
    ap.add_argument("--dir", default="/var/tmp/ckpt-bench")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    for kind in args.kinds.split(","):
        bench_kind(args.dir, kind, args.mib)


if __name__ == "__main__":
    main()
