"""engine.reuse_checks: how a checkpoint checks the chunks it reuses. A periodic one re-reads its rotating slice; a
final one, on the notice's deadline, checks every chunk by its stat and re-reads only what stats otherwise."""

from __future__ import annotations

import os

from ckpt_helpers import CallCounter

from ckpt_agent.checkpoint.engine import SCRUB_SLICES, reuse_checks
from ckpt_agent.store import chunks as chunkstore
from ckpt_agent.store.chunks import ChunkStore

CHUNKS = 64


def _stored(root: str):
    """CHUNKS chunks this process wrote (so it holds their stat), and their data."""
    writer = ChunkStore(root, compression="none")
    blobs = [os.urandom(4096) for _ in range(CHUNKS)]
    return [writer.put(b)[0] for b in blobs], blobs


def _reuse(root: str, refs, blobs, number: int, final: bool, monkeypatch):
    """Store the same data again as checkpoint `number` would: (chunks checked, chunk files read back)."""
    reads = CallCounter(monkeypatch, chunkstore, "read_regular_stat")
    store = ChunkStore(root, compression="none", known={r.digest: r.codec for r in refs})
    store.verify_reused, store.scrub = reuse_checks(number, final)
    checked = sum(store.put(b)[1].chunks_verified for b in blobs)
    return checked, reads.n


def test_a_final_checkpoint_checks_every_reused_chunk_by_its_stat_and_reads_none_back(tmp_path, monkeypatch):
    refs, blobs = _stored(str(tmp_path / "chunks"))
    assert _reuse(str(tmp_path / "chunks"), refs, blobs, 5, True, monkeypatch) == (CHUNKS, 0)


def test_a_final_checkpoint_reads_back_a_chunk_that_changed_since(tmp_path, monkeypatch):
    refs, blobs = _stored(str(tmp_path / "chunks"))
    path = ChunkStore(str(tmp_path / "chunks")).path(refs[3])
    with open(path, "r+b") as fh:
        fh.write(b"rot")
    checked, reads = _reuse(str(tmp_path / "chunks"), refs, blobs, 5, True, monkeypatch)
    assert (checked, reads) == (CHUNKS, 1)
    with open(path, "rb") as fh:
        assert fh.read() == blobs[3], "rewritten from the fresh data"


def test_a_periodic_checkpoint_re_reads_its_slice_and_checks_no_other(tmp_path, monkeypatch):
    refs, blobs = _stored(str(tmp_path / "chunks"))
    number = 3
    in_slice = [r for r in refs if int(r.digest[:2], 16) % SCRUB_SLICES == number % SCRUB_SLICES]
    assert 0 < len(in_slice) < CHUNKS
    assert _reuse(str(tmp_path / "chunks"), refs, blobs, number, False, monkeypatch) == (len(in_slice),
                                                                                         len(in_slice))
