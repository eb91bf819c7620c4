"""`ckpt verify`: check that the newest checkpoint of a job step is intact, chunk by chunk."""

from __future__ import annotations

import argparse
import concurrent.futures

from ckpt_agent.commands._common import (
    add_config_args,
    add_job_args,
    job_id_from_env,
    load,
    open_store,
)
from ckpt_agent.store import pagedelta
from ckpt_agent.store.chunks import WORKERS, verify_refs

HELP = "verify the newest checkpoint of a job (exit 0 when intact, 65 naming the damaged part otherwise)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_args(parser, required=False)
    add_config_args(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load(args)
    store = open_store(cfg, args)
    job_id = job_id_from_env(args.job_id)
    gen = store.latest_generation(job_id, args.name)
    manifest = store.load_manifest(gen)
    chunks = store.chunks_for(job_id)
    count = size = 0
    files = [f for f in manifest.files if f.kind == "file"]
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for img in manifest.images:
            where = f"checkpoint {gen.number} image {img.name}"
            verify_refs(chunks, img.chunks, pool, where)
            count += len(img.chunks)
            size += img.size
            for part, table in (("page table", img.pagetable), ("slice table", img.slice_table)):
                if table is not None:
                    verify_refs(chunks, table.chunks, pool, f"{where} {part}")
                    count += len(table.chunks)
        pagedelta.load_slices(chunks, manifest.images)  # and the slices fit their chunks and the image's size
        for f in files:
            verify_refs(chunks, f.chunks or [], pool, f"checkpoint {gen.number} file {f.path}")
            count += len(f.chunks or [])
            size += f.size
    print(f"job {job_id} step {args.name} checkpoint {gen.number} ({manifest.created}): intact, "
          f"{len(manifest.images)} images and {len(files)} files, {count} chunks, {size} bytes")
    return 0
