"""checkpoint/zeropages.py: a streamed restore leaves out zero runs of private anonymous memory, and nothing else."""

from __future__ import annotations

import json
import struct

import pytest
from ckpt_helpers import DATA, backstop, run_ckpt, start_ckpt, stop_ckpt_run, wait_for, written_only_here

from ckpt_agent.adapters import criu
from ckpt_agent.checkpoint import zeropages
from ckpt_agent.store.chunks import CHUNK_BYTES, SHA256_ZERO_CHUNK_DIGEST, ZERO_CHUNK_DIGEST, ChunkRef

PAGE = criu.PAGE_SIZE
MIB = 1 << 20
HEAD = struct.pack("<III", 0x54564319, 0x56084025, 2) + b"\x08\x05"  # pagemap_head{pages_id: 5}
PRESENT = 4
ZERO = ChunkRef(ZERO_CHUNK_DIGEST, CHUNK_BYTES, "zstd")
DATA_CHUNK = ChunkRef("ab" * 32, CHUNK_BYTES, "raw")
ANON, FILE_PRIVATE = 1 << 0 | 1 << 9, 1 << 0 | 1 << 6


def field(number, value):
    return criu._varint(number << 3) + criu._varint(value)


def mm_image(*vmas):
    """An mm-N.img with vma entries (start, end, status, flags)."""
    body = field(1, 0x400000)
    for start, end, status, flags in vmas:
        vma = field(1, start) + field(2, end) + field(3, 0) + field(4, 0) + field(5, 3) + field(6, flags) \
            + field(7, status) + field(8, 1)
        body += criu._varint(14 << 3 | 2) + criu._varint(len(vma)) + vma
    return struct.pack("<III", 0x54564319, 0x57492820, len(body)) + body


def test_the_plain_private_anonymous_mappings_of_an_mm_image():
    image = mm_image((0x20000000, 0x20100000, FILE_PRIVATE, 2),
                     (0x10000000, 0x10800000, ANON, 0x22),
                     (0x30000000, 0x30200000, ANON | 1 << 5, 0x22),  # the heap
                     (0x40000000, 0x40200000, ANON, 0x22 | 0x40000),  # MAP_HUGETLB
                     (0x50000000, 0x50001000, ANON | 1 << 13, 0x22),  # an AIO ring
                     (0x60000000, 0x60001000, ANON | 1 << 8, 0x21))  # (and shared)
    assert criu.anon_private_vmas(image) == [(0x10000000, 0x10800000), (0x30000000, 0x30200000)]
    with pytest.raises(ValueError):
        criu.anon_private_vmas(image[:-3])
    with pytest.raises(ValueError):
        criu.anon_private_vmas(HEAD)


def test_a_pagemap_is_read_and_written_again_as_criu_lays_it_out():
    entries = [(0x10000000, 300, PRESENT), (0x7F0000200000, 3, PRESENT | 2)]
    image = criu.encode_pagemap(HEAD, entries)
    assert criu.pagemap_present_entries(image) == (HEAD, entries)
    assert criu.pagemap_entries(image) == (5, [(0x10000000, 300, False), (0x7F0000200000, 3, False)])
    with_hole = criu.encode_pagemap(HEAD, [(0x10000000, 3, 1)])  # PE_PARENT: not what a restore serves
    with pytest.raises(ValueError):
        criu.pagemap_present_entries(with_hole)
    with pytest.raises(ValueError):
        criu.pagemap_present_entries(image[:-2])


def test_zero_spans_are_the_bytes_taken_from_the_all_zero_chunk():
    refs = [DATA_CHUNK, ZERO, ChunkRef(SHA256_ZERO_CHUNK_DIGEST, CHUNK_BYTES, "raw"),
            ChunkRef(ZERO_CHUNK_DIGEST, 4096, "raw")]  # (only a whole chunk of zeros is the all-zero chunk)
    pieces = [(0, 0, MIB), (1, 0, 8192), (1, 0, MIB), (0, 0, 4096), (2, 0, MIB), (3, 0, 4096)]
    assert zeropages.zero_spans(pieces, refs) == [(MIB, 2 * MIB + 8192), (2 * MIB + 12288, 3 * MIB + 12288)]
    assert zeropages.zero_spans(pieces, [DATA_CHUNK] * 4) == []


def test_a_zero_run_in_anonymous_memory_is_left_out_and_one_in_a_file_mapping_is_not():
    anon, filed = 0x10000000, 0x20000000
    mm = mm_image((anon, anon + 8 * MIB, ANON, 0x22), (filed, filed + 4 * MIB, FILE_PRIVATE, 2))
    # the pages image: anon's 8 MiB (its MiBs 2-4 zero), then the file mapping's 4 MiB (its MiB 1 zero)
    pagemap = criu.encode_pagemap(HEAD, [(anon, 2048, PRESENT), (filed, 1024, PRESENT)])
    spans = [(2 * MIB, 5 * MIB), (9 * MIB, 10 * MIB)]
    plan = zeropages.plan(pagemap, mm, spans)
    assert plan.cut == [(2 * MIB, 5 * MIB)]
    assert plan.pages == 768
    assert criu.pagemap_present_entries(plan.pagemap)[1] == [
        (anon, 512, PRESENT), (anon + 5 * MIB, 768, PRESENT), (filed, 1024, PRESENT)]
    # a run that crosses an entry's end, and a run of one page
    pagemap = criu.encode_pagemap(HEAD, [(anon, 1024, PRESENT), (anon + 6 * MIB, 512, PRESENT)])
    plan = zeropages.plan(pagemap, mm, [(3 * MIB, 5 * MIB), (5 * MIB + PAGE, 5 * MIB + 2 * PAGE)])
    assert plan.cut == [(3 * MIB, 4 * MIB), (4 * MIB, 5 * MIB), (5 * MIB + PAGE, 5 * MIB + 2 * PAGE)]
    assert plan.pages == 513
    assert criu.pagemap_present_entries(plan.pagemap)[1] == [
        (anon, 768, PRESENT), (anon + 7 * MIB, 1, PRESENT), (anon + 7 * MIB + 2 * PAGE, 254, PRESENT)]
    assert zeropages.plan(pagemap, mm, []) is None
    assert zeropages.plan(pagemap, mm_image((filed, filed + MIB, FILE_PRIVATE, 2)), spans) is None


def test_zeros_are_left_out_only_where_there_are_more_of_them_than_pagemap_entries_to_split():
    anon = 0x7F0000000000  # (where mmap puts memory: entries of ENTRY_BYTES)
    mm = mm_image((anon, anon + 64 * MIB, ANON, 0x22))
    entries = [(anon + 8 * i * PAGE, 4, PRESENT) for i in range(1000)]  # 4 pages of every 8
    pagemap = criu.encode_pagemap(HEAD, entries)
    need = zeropages.PAGES_PER_ENTRY * len(pagemap) // zeropages.ENTRY_BYTES
    assert 2000 <= need < 2004
    assert zeropages.plan(pagemap, mm, [(0, (need - 1) * PAGE)]) is None
    plan = zeropages.plan(pagemap, mm, [(0, need * PAGE)])
    assert plan.pages == need
    assert criu.pagemap_present_entries(plan.pagemap)[1] == [
        (entries[500][0] + (need - 2000) * PAGE, 2004 - need, PRESENT)] + entries[501:]


def test_a_zero_run_is_cut_to_whole_pages_and_to_its_mapping():
    anon = 0x10000000
    mm = mm_image((anon + MIB, anon + 3 * MIB, ANON, 0x22))
    pagemap = criu.encode_pagemap(HEAD, [(anon, 1024, PRESENT)])
    plan = zeropages.plan(pagemap, mm, [(100, 4 * MIB - 1)])  # not on page bounds, and past the mapping's ends
    assert plan.cut == [(MIB, 3 * MIB)]
    assert criu.pagemap_present_entries(plan.pagemap)[1] == [(anon, 256, PRESENT), (anon + 3 * MIB, 256, PRESENT)]


def test_pieces_are_cut_where_the_plan_left_bytes_out():
    pieces = [(0, 0, MIB), (1, 4096, 8192), (2, 0, MIB)]
    assert zeropages.cut_pieces(pieces, []) == pieces
    assert zeropages.cut_pieces(pieces, [(4096, MIB + 4096), (MIB + 8192, MIB + 8192 + 4096)]) == [
        (0, 0, 4096), (1, 8192, 4096), (2, 4096, MIB - 4096)]
    assert zeropages.cut_pieces(pieces, [(0, 2 * MIB + 8192)]) == []


@pytest.mark.criu
def test_a_restore_leaves_zero_runs_of_anonymous_memory_unmapped_and_every_mapping_as_it_was(ck, tmp_path):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    job = "171"
    roles = ("parent", "child")

    def check():
        (work / "check").touch()
        wait_for(lambda: all((work / f"checked-{r}").exists() for r in roles), 60, "both processes to check")
        reports = {r: json.loads((work / f"checked-{r}").read_text()) for r in roles}
        (work / "check").unlink()
        for r in roles:
            (work / f"checked-{r}").unlink()
        return reports

    def segment(n, *run_args, then):
        """`ckpt run` of the tool (a fresh start, or a restore), `then(proc)` done with it, stopped on every path."""
        proc = start_ckpt("run", "--job-id", job, *run_args, "--", "python3", str(DATA / "runner" / "zerotool.py"),
                          env=env, cwd=work, out=tmp_path / f"o{n}", err=tmp_path / f"e{n}")
        try:
            if n > 1:
                wait_for(lambda: "resumed job" in (tmp_path / f"e{n}").read_text(), 60, f"restore {n - 1}")
            return then(proc)
        finally:
            stop_ckpt_run(proc, runtime, job)

    def final(proc):
        done = run_ckpt("checkpoint", "--job-id", job, "--final", env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert proc.wait(timeout=backstop(30)) == 75

    def first(proc):
        wait_for(lambda: all((work / f"ready-{r}").exists() for r in roles), 60, "the tool and its child")
        before = check()
        for r in roles:  # the zeros were written: every page is there, and the check can tell a left-out one
            assert before[r]["differs"] == [], before
            assert before[r]["resident"] == before[r]["pages"], before
        final(proc)

    def second(proc):
        after = check()
        # the pages left out, written now, are in the next checkpoint (written-only where this kernel tracks)
        (work / "scribble").touch()
        wait_for(lambda: all((work / f"scribbled-{r}").exists() for r in roles), 60, "both processes to write")
        (work / "scribble").unlink()
        final(proc)
        return after

    def third(proc):
        again = check()
        (work / "stop").touch()
        assert proc.wait(timeout=backstop(60)) == 0
        return again

    segment(1, "--interval", "1000", then=first)
    after = segment(2, then=second)
    for r in roles:
        assert after[r]["differs"] == [], after
        # the file mapping's zeros are copies over a file of 0xAB: restored page by page
        assert after[r]["resident"]["file"] == after[r]["pages"]["file"], after
    # anonymous zero runs: the chunks wholly inside them are left out; a chunk at either end may hold other pages too
    # (a dump cuts its chunks every CHUNK_BYTES of the pages image), so it is restored
    for role, run in (("parent", "anon"), ("child", "anon"), ("parent", "after"), ("child", "before")):
        assert after[role]["resident"][run] <= 2 * CHUNK_BYTES // PAGE < after[role]["pages"][run], (role, run, after)
    stats = json.loads((store / job / "main" / "gen-000002" / "manifest.json").read_text())["manifest"]["stats"]
    if written_only_here():  # the pages left out and not written since were no pages to CRIU, not holes
        assert stats.get("pages_unchanged", 0) > 0, stats
    again = segment(3, then=third)
    for r in roles:
        assert again[r]["differs"] == [], again
