"""ckpt_agent.store.manifest: the manifest's dataclasses, written and read byte for byte as format 2 (a manifest an
earlier agent signed still verifies and is written again identically), format 3's slice tables, round trips, and one
located line for every malformed, edited or unknown manifest."""

from __future__ import annotations

import copy
import json
import os

import pytest

from ckpt_agent.errors import EXIT_DAMAGED, DamagedCheckpointError, PermissionDenied, StoreError
from ckpt_agent.store import pagedelta
from ckpt_agent.store.chunks import ChunkRef
from ckpt_agent.store.generations import Signer
from ckpt_agent.store.manifest import (
    FORMAT_VERSION,
    PAGE_TABLE_ENTRY_BYTES,
    SLICE_BYTES,
    FileEntry,
    ImageEntry,
    Manifest,
    PageTable,
    Slices,
    Stats,
    Summary,
    canonical_json,
    check_loaded_slices,
    decode,
    encode,
    parse,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "store")
# manifest-format2.json and summary.json were written by the agent before the manifest became dataclasses
# (CheckpointStore.commit of a dict), signed with this key; manifest-format3.json by the agent that introduced format 3
GOLDEN_KEY = b"test-key-for-the-golden-manifest"
WHERE = "/store/4242/main/gen-000003/manifest.json"


def golden() -> bytes:
    with open(os.path.join(DATA, "manifest-format2.json"), "rb") as fh:
        return fh.read()


def golden_body() -> dict:
    return json.loads(golden())["manifest"]


def ref(ch: str, size: int, codec: str = "r") -> ChunkRef:
    return ChunkRef(ch * 64, size, codec)


def test_a_manifest_an_earlier_agent_signed_verifies_and_is_written_again_byte_for_byte():
    signer = Signer(GOLDEN_KEY)
    m = decode(golden(), WHERE, signer, require_signature=True)
    assert encode(m, signer) == golden()
    with open(os.path.join(DATA, "summary.json"), "rb") as fh:
        assert json.dumps(m.summary().to_json()).encode() == fh.read()


def test_a_format3_manifest_signed_by_this_version_verifies_and_is_written_again_byte_for_byte():
    """manifest-format3.json: the golden manifest as format 3 writes it (pages-2.img's slices in a slice table), for
    the agents after this one to read."""
    with open(os.path.join(DATA, "manifest-format3.json"), "rb") as fh:
        data = fh.read()
    signer = Signer(GOLDEN_KEY)
    m = decode(data, WHERE, signer, require_signature=True)
    assert m.format == 3 and encode(m, signer) == data
    delta = m.images[2]
    assert delta.slices is None and delta.slice_table.count == 2 and delta.chunks == format3_delta().chunks


def test_readers_get_attributes():
    m = decode(golden(), WHERE, Signer(GOLDEN_KEY))
    assert (m.format, m.job_id, m.step, m.generation, m.final, m.reason) == (2, "4242", "main", 3, False, "periodic")
    assert (m.cwd, m.uid, m.gid, m.argv) == ("/home/alice/run", 1001, 1001, ["spice", "-b", "deck.sp"])
    assert m.pipes == {"stdout": 1234, "stderr": 1235, "status": 1236}
    core, full, delta = m.images
    assert core.chunks == [ref("a", 300)] and core.slices is None and core.pagetable is None
    assert full.pagetable == PageTable(hash="xxh3_128", pages=2, chunks=[ref("d", 48)])
    assert delta.slices == [[0, 0, 4096], [1, 0, 4096]] and delta.delta_depth == 1
    assert delta.pieces() == delta.slices and full.pieces() == [(0, 0, 4096), (1, 0, 4096)]
    d, f, s = m.files
    assert (d.kind, f.kind, s.kind) == ("dir", "file", "symlink")
    assert f.chunks == [ref("0", 10)] and f.size == 10 and s.target == "out.log" and d.chunks is None
    assert m.stats.bytes_in == 16694 and m.stats.seconds["frozen_seconds"] == 0.412
    assert m.image_bytes() == 300 + 8192 + 8192
    digests = {r.digest[0] for r in m.refs()}
    assert digests == set("abcdef0"), "images, page tables and files all keep their chunks"


def test_a_manifest_built_from_dataclasses_round_trips():
    m = Manifest(
        format=FORMAT_VERSION, created="2026-12-03T06:00:00.000001Z", job_id="7_2", step="main", generation=1,
        final=True, reason="spot interruption", machine={"arch": "aarch64"}, node="n1", instance={}, cwd="/w",
        argv=["a"], uid=0, gid=0, pipes={"stdout": 1},
        images=[ImageEntry(name="pages-1.img", size=5, chunks=[ref("1", 5, "z")],
                           pagetable=PageTable(hash=None, pages=1, chunks=[ref("2", 24)]))],
        files=[FileEntry(path="/w/x", kind="file", mode=0o100644, uid=0, gid=0, mtime_ns=1, size=3,
                         chunks=[ref("3", 3)])],
        stats=Stats(bytes_in=8, chunks_new=2, seconds={"dump_seconds": 0.5}),
    )
    for signer in (Signer(None), Signer(b"k")):
        assert decode(encode(m, signer), WHERE, signer) == m
    assert parse(m.to_json(), WHERE).to_json() == m.to_json()


def test_a_manifest_no_reader_would_accept_is_never_written(monkeypatch):
    """A manifest over the read bound would read as damaged once committed (and a restore fall back past it):
    encode refuses it, so the checkpoint fails where it is taken, with the reason."""
    from ckpt_agent.store import manifest as manifest_module

    m = parse(golden_body(), WHERE)
    data = encode(m, Signer(None))
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", len(data) - 1)
    with pytest.raises(StoreError, match=rf"takes {len(data)} bytes, more than a reader accepts \({len(data) - 1}\)"):
        encode(m, Signer(None))
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", len(data))
    assert decode(encode(m, Signer(None)), WHERE, Signer(None)) == m


def test_keys_this_version_does_not_know_are_kept():
    body = golden_body()
    body["added_later"] = {"x": 1}
    body["images"][0]["hint"] = "later"
    body["images"][1]["pagetable"]["algo"] = 2
    body["stats"]["new_counter"] = 5
    m = parse(copy.deepcopy(body), WHERE)
    assert m.extra == {"added_later": {"x": 1}} and m.images[0].extra == {"hint": "later"}
    assert canonical_json(m.to_json()) == canonical_json(body)


def format3_delta() -> ImageEntry:
    """pages-2.img of the golden manifest as format 3 writes it: its slices in a slice table of their own."""
    body = golden_body()["images"][2]
    slices = body.pop("slices")
    entry = ImageEntry.from_json({**body, "slicetable": {"count": len(slices), "chunks": [["9" * 64, 24, "r"]]}})
    assert entry.slices is None
    return entry


def test_a_format3_manifest_keeps_its_slices_out_of_the_json_and_round_trips():
    m = parse(golden_body(), WHERE)
    m.format = FORMAT_VERSION
    m.images[2] = format3_delta()
    body = m.to_json()
    assert "slices" not in body["images"][2] and body["images"][2]["slicetable"]["count"] == 2
    for signer in (Signer(None), Signer(b"k")):
        assert decode(encode(m, signer), WHERE, signer) == m
    assert "9" in {r.digest[0] for r in m.refs()}, "gc keeps the slice table's chunks"
    with pytest.raises(RuntimeError, match="pages-2.img: its slices are not read yet"):
        m.images[2].pieces()


def test_slices_are_32_bit_words_little_endian_and_compare_as_sequences():
    s = Slices.of([[0, 0, 4096], [1, 8192, 4096]])
    assert s.to_bytes() == bytes.fromhex("00000000" "00000000" "00100000" "01000000" "00200000" "00100000")
    assert Slices.from_bytes(s.to_bytes()) == s == [(0, 0, 4096), (1, 8192, 4096)] and len(s) * SLICE_BYTES == 24
    assert s[-1] == (1, 8192, 4096) and list(s) == [(0, 0, 4096), (1, 8192, 4096)]
    with pytest.raises(IndexError):
        s[2]
    with pytest.raises(ValueError, match="not whole slices"):
        Slices.from_bytes(b"\0" * 13)


@pytest.mark.parametrize("slices, what", [
    ([[0, 0, 4096]], "does not hold the slices it counts"),
    ([[0, 0, 4096], [2, 0, 4096]], "names no chunk"),
    ([[0, 0, 4096], [1, 0, 0]], "is empty"),
    ([[0, 0, 4096], [1, 1, 4096]], "leaves its chunk"),
    ([[0, 0, 4096], [1, 0, 2048]], "image's size disagree"),
], ids=["count", "index", "empty", "leaves", "size"])
def test_slices_read_from_a_slice_table_are_checked_against_the_entry(slices, what):
    entry = format3_delta()
    with pytest.raises(DamagedCheckpointError, match=f"^x: image pages-2.img: bad slice table: .*{what}"):
        check_loaded_slices(entry, Slices.of(slices), "x")
    check_loaded_slices(entry, Slices.of([[0, 0, 4096], [1, 0, 4096]]), "x")


def test_a_summary_that_is_not_well_formed_is_none():
    good = Summary(3, "t", False, "periodic", "n", 1, 2)
    assert Summary.from_json(good.to_json()) == good
    for bad in ({**good.to_json(), "generation": "3"}, {"generation": 3}, [], None):
        assert Summary.from_json(bad) is None


def test_the_page_table_entry_size_is_pagedeltas():
    assert pagedelta._ENTRY.size == PAGE_TABLE_ENTRY_BYTES


# --- malformed, edited and unknown manifests -------------------------------------------------------------------
def edited(change) -> bytes:
    envelope = json.loads(golden())
    change(envelope["manifest"])
    return canonical_json(envelope)


def test_an_edited_manifest_no_longer_matches_its_signature():
    data = edited(lambda m: m.update(uid=0))
    with pytest.raises(DamagedCheckpointError, match="signature does not match") as e:
        decode(data, WHERE, Signer(GOLDEN_KEY))
    assert str(e.value).startswith(WHERE) and e.value.exit_code == EXIT_DAMAGED
    with pytest.raises(DamagedCheckpointError, match="signature does not match"):
        decode(golden(), WHERE, Signer(b"another key"))


def test_an_unsigned_manifest_is_refused_where_a_key_exists_and_unverifiable_without_one():
    unsigned = canonical_json({"manifest": golden_body()})
    with pytest.raises(DamagedCheckpointError, match="not signed"):
        decode(unsigned, WHERE, Signer(GOLDEN_KEY))
    assert decode(unsigned, WHERE, Signer(None)).job_id == "4242"
    with pytest.raises(PermissionDenied):
        decode(unsigned, WHERE, Signer(None), require_signature=True)


@pytest.mark.parametrize("fmt", [FORMAT_VERSION + 1, 0, "2", None, True, 2.0], ids=repr)
def test_an_unknown_format_is_named(fmt):
    data = edited(lambda m: m.update(format=fmt))
    with pytest.raises(DamagedCheckpointError, match=f"unsupported manifest format {fmt!r}"):
        decode(data, WHERE, Signer(None))


def test_format_1_is_still_read():
    assert decode(edited(lambda m: m.update(format=1)), WHERE, Signer(None)).format == 1


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b'{"other": {}}', b'{"manifest": []}', b"[" * 100000],
                         ids=["empty", "text", "list", "no-manifest", "manifest-not-object", "deep"])
def test_an_unreadable_file_is_damaged(raw):
    with pytest.raises(DamagedCheckpointError, match="manifest is unreadable") as e:
        decode(raw, WHERE, Signer(None))
    assert str(e.value).startswith(WHERE) and "\n" not in str(e.value)


def drop(key):
    return lambda m: m.pop(key)


MALFORMED = {
    "no-created": (drop("created"), "'created' is missing"),
    "images-not-list": (lambda m: m.update(images={}), "'images' is missing or not a list"),
    "no-files": (drop("files"), "'files' is missing or not a list"),
    "image-name-escapes": (lambda m: m["images"][0].update(name="../x"), "bad image entry"),
    "image-size-lies": (lambda m: m["images"][0].update(size=301), "image core-1.img: size and chunks disagree"),
    "chunk-unknown-codec": (lambda m: m["images"][0].update(chunks=[["a" * 64, 300, "q"]]), "bad chunk reference"),
    "chunk-not-a-digest": (lambda m: m["images"][0].update(chunks=[["../../etc", 300, "r"]]), "bad chunk reference"),
    "slice-leaves-chunk": (lambda m: m["images"][2].update(slices=[[0, 1, 4096], [1, 0, 4096]]),
                           "image pages-2.img: bad slices"),
    "page-table-count": (lambda m: m["images"][1]["pagetable"].update(pages=3), "image pages-1.img: bad page table"),
    "slice-table-count": (lambda m: m["images"][2].update(slicetable={"count": 3, "chunks": [["9" * 64, 24, "r"]]}),
                          "image pages-2.img: bad slice table"),
    "slice-table-empty": (lambda m: m["images"][2].update(slicetable={"count": 0, "chunks": []}),
                          "image pages-2.img: bad slice table"),
    "slice-table-not-a-mapping": (lambda m: m["images"][2].update(slicetable=[2]),
                                  "image pages-2.img: bad slice table"),
    "slice-table-and-inline": (lambda m: m["images"][2].update(slicetable={"count": 2,
                                                                           "chunks": [["9" * 64, 24, "r"]]}),
                               "image pages-2.img: bad slice table"),
    "delta-depth": (lambda m: m["images"][2].update(delta_depth="1"), "'delta_depth' is not a whole number"),
    "file-kind": (lambda m: m["files"][0].update(kind="fifo"), "bad file entry"),
    "file-relative": (lambda m: m["files"][0].update(path="home/x"), "is not absolute and normal"),
    "file-size-lies": (lambda m: m["files"][1].update(size=11), "size and chunks disagree"),
    "symlink-target": (lambda m: m["files"][2].update(target=7), "symlink /home/alice/run/latest: bad target"),
    "cwd": (lambda m: m.update(cwd=["/"]), "'cwd' is not a string"),
    "uid": (lambda m: m.update(uid="0"), "'uid' is not a whole number"),
    "uid-bool": (lambda m: m.update(uid=True), "'uid' is not a whole number"),
    "final": (lambda m: m.update(final="yes"), "'final' is not true or false"),
    "pipes": (lambda m: m.update(pipes=[]), "'pipes' is not a mapping"),
    "pipe-inode": (lambda m: m.update(pipes={"stdout": "1234"}), "'pipes' does not map names to inode numbers"),
    "stats": (lambda m: m.update(stats=[]), "'stats' is not a mapping"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_manifest_is_damaged_with_one_line_naming_file_and_part(name):
    change, what = MALFORMED[name]
    with pytest.raises(DamagedCheckpointError) as e:
        decode(edited(change), WHERE, Signer(None))
    msg = str(e.value)
    assert msg.startswith(f"{WHERE}: malformed manifest: ") and what in msg and "\n" not in msg, msg
