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
from ckpt_agent.store.chunks import WORKERS, ChunkRef, verify_refs

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
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for img in manifest["images"]:
            refs = [ChunkRef.from_json(c) for c in img["chunks"]]
            verify_refs(chunks, refs, pool, f"checkpoint {gen.number} image {img['name']}")
            count += len(refs)
            size += img["size"]
        for f in manifest["files"]:
            if f["kind"] == "file":
                refs = [ChunkRef.from_json(c) for c in f["chunks"]]
                verify_refs(chunks, refs, pool, f"checkpoint {gen.number} file {f['path']}")
                count += len(refs)
                size += f["size"]
    print(f"job {job_id} step {args.name} checkpoint {gen.number} ({manifest['created']}): intact, "
          f"{len(manifest['images'])} images and {sum(1 for f in manifest['files'] if f['kind'] == 'file')} files, "
          f"{count} chunks, {size} bytes")
    return 0
