"""Where everything lives in the checkpoint store: the one owner of its names, paths and chunk suffixes.

    <store>/<job-id>/                     job_dir (array tasks: <array-job>_<task>); mode 0700
        lock                              LOCK: writers hold it shared, `ckpt gc` exclusive (flock)
        events.jsonl                      EVENTS: lifecycle events
        chunks/<xx>/<digest><suffix>      CHUNKS_DIR, chunk_name: BLAKE3 (sha256 before format 4) hex; the suffix
                                          names the codec (CODEC_SUFFIXES)
        <step>/                           step_dir
            run.lock                      RUN_LOCK: the one live `ckpt run` of the step holds it (flock)
            gen-000003/                   generation_name: a committed checkpoint
                manifest.json             MANIFEST (store/manifest.py owns its content)
                summary.json              SUMMARY: the listing facts of the generation
            gen-000004.partial-<pid>/     partial_name: a checkpoint being written
            result.json                   RESULT: the step finished
    <store>/.history/<job>.jsonl          HISTORY_DIR: events of jobs `ckpt gc` removed, for `ckpt report`

Every module that names a file or directory of the store takes the name from here; a codec added to
CODEC_SUFFIXES is known at once to the chunk store's reader, writer and sweep.
"""

from __future__ import annotations

import os
import re
from typing import Dict, Optional

from ckpt_agent.errors import UsageError

LOCK = "lock"
RUN_LOCK = "run.lock"  # <step>/run.lock: held (flock) by the one live wrapper of the step (checkpoint/runner.py)
EVENTS = "events.jsonl"
CHUNKS_DIR = "chunks"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
RESULT = "result.json"
HISTORY_DIR = ".history"  # events of removed jobs, for `ckpt report`; a dot name is never taken for a job

# codecs as a manifest's chunk references name them -> the suffix of the chunk's file name
CODEC_RAW = "r"
CODEC_ZSTD = "z"
CODEC_SUFFIXES: Dict[str, str] = {CODEC_RAW: "", CODEC_ZSTD: ".zst"}
# the hashes that name chunks, the default first (store/chunks.py chunk_digest; checkpoint.chunk_digest chooses, and a
# reader accepts either): 64 hex digits each
CHUNK_DIGESTS = ("blake3", "sha256")
TMP_MARK = ".tmp-"  # a chunk being written: `<name>.tmp-<pid>-<n>`, never a chunk

GEN_RE = re.compile(r"^gen-(\d{6,})\Z")
PARTIAL_RE = re.compile(r"^gen-(\d{6,})\.partial-(\d+)\Z")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z")  # \Z: "$" would accept a trailing newline
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")


def check_name(kind: str, value: str) -> str:
    """Job ids and step names become directory names: refuse anything that could escape the store."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or value in (".", ".."):
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:80] + "..."
        raise UsageError(f"invalid {kind} {shown!r}: use up to 128 letters, digits, '_', '-', '.', '+' "
                         "(not starting with '.', '-' or '+')")
    return value


def is_job_name(name: str) -> bool:
    """A directory name the store could have made for a job (HISTORY_DIR and other dot names never are)."""
    return bool(SAFE_NAME.fullmatch(name))


def is_step_name(name: str) -> bool:
    return name != CHUNKS_DIR and is_job_name(name)


def job_dir(root: str, job_id: str) -> str:
    return os.path.join(root, check_name("job id", job_id))


def step_dir(root: str, job_id: str, step: str) -> str:
    return os.path.join(job_dir(root, job_id), check_name("step name", step))


def chunk_dir(root: str, job_id: str) -> str:
    return os.path.join(job_dir(root, job_id), CHUNKS_DIR)


def history_path(root: str, job_id: str) -> str:
    return os.path.join(root, HISTORY_DIR, f"{job_id}.jsonl")


def generation_name(number: int) -> str:
    return f"gen-{number:06d}"


def partial_name(number: int, pid: int) -> str:
    return f"{generation_name(number)}.partial-{pid}"


def generation_number(name: str) -> Optional[int]:
    """The number of a committed generation's directory name, None for any other name."""
    m = GEN_RE.match(name)
    return int(m.group(1)) if m else None


def partial_number(name: str) -> Optional[int]:
    """The number a partial generation's directory name reserves, None for any other name."""
    m = PARTIAL_RE.match(name)
    return int(m.group(1)) if m else None


def chunk_name(digest: str, codec: str) -> str:
    return digest + CODEC_SUFFIXES[codec]


def chunk_relpath(digest: str, codec: str) -> str:
    """The chunk's path below the job's chunk directory: `<first two hex digits>/<name>` (a string built, not
    joined: it is made for every chunk a checkpoint checks)."""
    return f"{digest[:2]}/{digest}{CODEC_SUFFIXES[codec]}"


def digest_of_chunk_name(name: str) -> Optional[str]:
    """The digest a chunk file's name stands for, with any codec's suffix; None for a temporary file or a name
    that is no chunk's (such files are never referenced, so the sweep removes them)."""
    if TMP_MARK in name:
        return None
    for suffix in CODEC_SUFFIXES.values():
        if suffix and name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name if _DIGEST_RE.match(name) else None
