"""ckpt_agent.store.layout: the store's names and paths, the codec -> chunk suffix table, and the chunk sweep that
knows every codec's suffix (a chunk of any codec survives the sweep after a commit; an orphan does not)."""

from __future__ import annotations

import os

import blake3
import pytest
from ckpt_helpers import store_with_job

from ckpt_agent.errors import UsageError
from ckpt_agent.store import layout
from ckpt_agent.store.chunks import ChunkRef, iter_chunk_files
from ckpt_agent.store.manifest import FORMAT_VERSION, ImageEntry, Manifest

JOB, STEP = "4242", "main"


@pytest.fixture
def store(tmp_path):
    return store_with_job(tmp_path, JOB, STEP)


def digest_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def test_paths_of_a_job(tmp_path):
    root = str(tmp_path)
    assert layout.job_dir(root, JOB) == os.path.join(root, JOB)
    assert layout.step_dir(root, JOB, STEP) == os.path.join(root, JOB, STEP)
    assert layout.chunk_dir(root, JOB) == os.path.join(root, JOB, "chunks")
    assert layout.history_path(root, JOB) == os.path.join(root, ".history", f"{JOB}.jsonl")


@pytest.mark.parametrize("bad", ["..", ".history", "a/b", "", "-x", "x\n"], ids=repr)
def test_paths_refuse_names_that_could_escape_the_store(tmp_path, bad):
    with pytest.raises(UsageError):
        layout.job_dir(str(tmp_path), bad)
    with pytest.raises(UsageError):
        layout.step_dir(str(tmp_path), JOB, bad)


def test_history_and_chunks_are_never_taken_for_a_job_or_a_step():
    assert not layout.is_job_name(layout.HISTORY_DIR)
    assert layout.is_job_name("chunks") and not layout.is_step_name(layout.CHUNKS_DIR)
    assert layout.is_job_name("123_4") and layout.is_step_name("main")


def test_generation_and_partial_names_round_trip():
    assert layout.generation_name(3) == "gen-000003"
    assert layout.generation_number("gen-000003") == 3
    assert layout.generation_number("gen-1234567") == 1234567
    assert layout.partial_name(4, 99) == "gen-000004.partial-99"
    assert layout.partial_number("gen-000004.partial-99") == 4
    for other in ("gen-000004.partial-99", "gen-3", "gen-000003\n", "summary.json"):
        assert layout.generation_number(other) is None
    assert layout.partial_number("gen-000004") is None


@pytest.mark.parametrize("codec", sorted(layout.CODEC_SUFFIXES))
def test_chunk_names_carry_their_codecs_suffix_and_give_the_digest_back(codec):
    digest = digest_of(codec.encode())
    name = layout.chunk_name(digest, codec)
    assert name == digest + layout.CODEC_SUFFIXES[codec]
    assert layout.chunk_relpath(digest, codec) == os.path.join(digest[:2], name)
    assert layout.digest_of_chunk_name(name) == digest


def test_codec_suffixes_are_distinct_and_only_raw_has_none():
    suffixes = list(layout.CODEC_SUFFIXES.values())
    assert len(set(suffixes)) == len(suffixes)
    assert layout.CODEC_SUFFIXES[layout.CODEC_RAW] == "" and layout.CODEC_SUFFIXES[layout.CODEC_ZSTD] == ".zst"


@pytest.mark.parametrize("name", ["0" * 64 + ".tmp-1-2", "0" * 64 + ".xz", "notes.txt", "0" * 63, "0" * 64 + ".zst.x"],
                         ids=["temporary", "unknown-suffix", "not-a-digest", "short", "suffix-after-suffix"])
def test_names_that_are_no_chunk_give_no_digest(name):
    assert layout.digest_of_chunk_name(name) is None


def write_chunk(store, digest: str, codec: str, payload: bytes = b"payload") -> str:
    path = os.path.join(store.chunk_dir(JOB), layout.chunk_relpath(digest, codec))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(payload)
    return path


def commit_refs(store, refs):
    number, partial = store.begin(JOB, STEP)
    image = ImageEntry(name="pages-1.img", size=sum(r.size for r in refs), chunks=list(refs))
    store.commit(partial, number, Manifest(format=FORMAT_VERSION, created="2026-12-03T00:00:00.000000Z",
                                           images=[image], files=[]))


@pytest.fixture
def a_new_codec(monkeypatch):
    """A codec added to the table (as a future one would be): the sweep must know it without being told."""
    monkeypatch.setitem(layout.CODEC_SUFFIXES, "x", ".xz")
    return "x"


def test_a_chunk_of_every_codec_survives_the_sweep_after_a_commit_and_an_orphan_does_not(store, a_new_codec):
    kept = {}
    for i, codec in enumerate(sorted(layout.CODEC_SUFFIXES)):
        digest = digest_of(f"chunk {i}".encode())
        kept[codec] = (ChunkRef(digest, 7, codec), write_chunk(store, digest, codec))
    orphan = write_chunk(store, digest_of(b"nothing refers to me"), layout.CODEC_ZSTD)
    stranger = write_chunk(store, digest_of(b"a file of nobody's codec"), layout.CODEC_RAW)
    os.rename(stranger, stranger + ".gz")  # a name that is no codec's: never referenced, so swept
    commit_refs(store, [ref for ref, _ in kept.values()])

    removed, freed = store.sweep_chunks(JOB)

    assert (removed, freed) == (2, 2 * len(b"payload"))
    for codec, (_, path) in kept.items():
        assert os.path.exists(path), f"the sweep removed a referenced chunk of codec {codec!r}"
    assert not os.path.exists(orphan) and not os.path.exists(stranger + ".gz")


def test_a_chunk_of_every_codec_is_listed_under_its_digest(store, a_new_codec):
    digests = {codec: digest_of(codec.encode()) for codec in layout.CODEC_SUFFIXES}
    for codec, digest in digests.items():
        write_chunk(store, digest, codec)
    assert {d for d, _ in iter_chunk_files(store.chunk_dir(JOB))} == set(digests.values())
