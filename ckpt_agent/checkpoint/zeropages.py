"""A streamed restore leaves out runs of zero pages that CRIU would restore as zeros anyway.

Where a whole chunk of a pages image holds only zeros (pages the tool wrote zeros to, or cleared), the store keeps
the one all-zero chunk, and a later checkpoint's pages unchanged since are slices of it, page by page. So the restore
knows those pages are zeros without reading anything. Fed to CRIU, each such page is still copied into the restored
process: 1 GiB of zeroed memory cost as much CPU as 1 GiB of data, and the restored process held every page of it.
Where such a run lies in a plain private anonymous mapping (criu.anon_private_vmas: the heap, the stack, malloc's and
the tool's own anonymous maps), a page the pagemap does not list is restored as a zero page by CRIU itself, never
read, and not resident until the tool touches it: the restore serves the task's pagemap without those runs and its
pages image without their bytes. A file-backed private mapping would show the file's bytes instead, so its zero
pages are served as before; so are the pages of shared memory (their own images) and of any image this module cannot
read (the plan is then None, and the images are served as stored).

Runs are left out down to a single page (a run splits a pagemap entry in two, and CRIU walks an entry for less than
it copies a page), where there are enough of them to pay for rewriting the pagemap (PAGES_PER_ENTRY). A cold restore
of 1 GiB of zeros after a final checkpoint that changed 5% of the pages at random places (the runs between them about
20 pages) took 0.27-0.30 s with every run left out (four runs), 0.41-0.45 s with runs of 16 pages and more (five),
and 0.80-0.88 s with none (five; scratch runs on the 2-vCPU dev VM, alternating).

What CRIU does with a page its pagemap leaves out (criu/mem.c, 4.2.1): a mapping restored in place, or premapped
afresh, is anonymous memory that reads as zeros; one inherited from the parent process (copy-on-write) has each such
page dropped with MADV_DONTNEED, which leaves a private anonymous page zero too. The next checkpoint finds those pages
absent, as it finds memory the tool never touched, and the restore after it leaves them out the same way.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Sequence, Tuple

from ckpt_agent.adapters import criu
from ckpt_agent.store.chunks import ChunkRef

log = logging.getLogger(__name__)

PAGE = criu.PAGE_SIZE
ENTRY_BYTES = 18  # a pagemap entry as CRIU 4.x writes it, with its size: 18 or 19 bytes
# Planning reads, splits and writes again every entry of the pagemap, about 4 us an entry here; CRIU takes about
# 2.3 us to restore a page (both on the 2-vCPU dev VM). So zeros are left out only where they are at least this many
# pages per pagemap entry: a final of 1 GiB of text after a 5% change had 25 thousand entries and 275 zero pages,
# which would have cost 0.1 s to save a millisecond.
PAGES_PER_ENTRY = 2


class Plan:
    """A task's pagemap without its zero runs (`pagemap`) and the byte ranges of its pages image left out with them
    (`cut`: (start, end) in file order). `pages` is how many pages are left out."""

    def __init__(self, pagemap: bytes, cut: List[Tuple[int, int]]):
        self.pagemap = pagemap
        self.cut = cut
        self.pages = sum(end - start for start, end in cut) // PAGE


def zero_spans(pieces: Iterable[Tuple[int, int, int]], refs: Sequence[ChunkRef]) -> List[Tuple[int, int]]:
    """(start, end) in an image's file of the bytes its pieces take from the all-zero chunk, merged, in order."""
    zero = {i for i, r in enumerate(refs) if r.all_zero()}
    spans: List[Tuple[int, int]] = []
    if not zero:
        return spans
    pos = 0
    for idx, _off, length in pieces:
        if idx in zero and length:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + length)
            else:
                spans.append((pos, pos + length))
        pos += length
    return spans


def plan(pagemap: bytes, mm: bytes, spans: Sequence[Tuple[int, int]]) -> Optional[Plan]:
    """The Plan for a task (its pagemap-N.img and mm-N.img, and zero_spans of its pages image), or None when nothing
    is left out, or too little to be worth it (PAGES_PER_ENTRY). ValueError when an image is not one this module
    reads (the caller then serves them as stored)."""
    if sum(end - start for start, end in spans) // PAGE < PAGES_PER_ENTRY * len(pagemap) // ENTRY_BYTES:
        return None
    vmas = criu.anon_private_vmas(mm)
    head, entries = criu.pagemap_present_entries(pagemap)
    out: List[Tuple[int, int, int]] = []
    cut: List[Tuple[int, int]] = []
    zi = vi = 0
    pos = 0
    for vaddr, nr, flags in entries:
        size = nr * PAGE
        start, end = pos, pos + size
        pos = end
        at = vaddr  # the entry's pages from here on are still to be emitted
        while zi < len(spans) and spans[zi][1] <= start:
            zi += 1
        k = zi
        while k < len(spans) and spans[k][0] < end:
            # the zero bytes inside this entry, as whole pages, as addresses
            zs = vaddr + _round_up(max(spans[k][0], start) - start)
            ze = vaddr + (min(spans[k][1], end) - start) // PAGE * PAGE
            k += 1
            while vi < len(vmas) and vmas[vi][1] <= zs:
                vi += 1
            j = vi
            while j < len(vmas) and vmas[j][0] < ze:
                s, e = max(zs, vmas[j][0]), min(ze, vmas[j][1])
                if e > s:
                    if s > at:
                        out.append((at, (s - at) // PAGE, flags))
                    cut.append((start + s - vaddr, start + e - vaddr))
                    at = e
                j += 1
        if at < vaddr + size:
            out.append((at, (vaddr + size - at) // PAGE, flags))
    if not cut:
        return None
    return Plan(criu.encode_pagemap(head, out), cut)


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def cut_pieces(pieces: Iterable[Tuple[int, int, int]], cut: Sequence[Tuple[int, int]]) -> List[Tuple[int, int, int]]:
    """The pieces (chunk index, offset, length) of an image without the file's byte ranges `cut` (in order)."""
    out: List[Tuple[int, int, int]] = []
    ci = 0
    pos = 0
    for idx, off, length in pieces:
        start, end = pos, pos + length
        pos = end
        while ci < len(cut) and cut[ci][1] <= start:
            ci += 1
        at = start
        k = ci
        while k < len(cut) and cut[k][0] < end:
            if cut[k][0] > at:
                out.append((idx, off + at - start, cut[k][0] - at))
            at = max(at, min(cut[k][1], end))
            k += 1
        if at < end:
            out.append((idx, off + at - start, end - at))
    return out
