"""adapters/softdirty.py: a tree is armed whole or not at all, an arming names its process by start time, and on a
kernel with soft-dirty bits (scripts/kernel-vm-check.sh runs these in a 6.1 guest) clearing and the restored
tree's signal-frame span do what the dump relies on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckpt_agent.adapters import softdirty
from ckpt_agent.adapters.softdirty import PM_SOFT_DIRTY, SoftDirtyTracker
from ckpt_agent.adapters.uffd import SIGNAL_FRAMES_SPAN, pagemap_bits, stack_pointers, wait_stopped, writable_mappings


def _fake_process(proc: Path, pid: int, start: int, clearable: bool = True) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30  # field 22, after "pid (comm) "
    (d / "stat").write_text(f"{pid} (tool) " + " ".join(fields) + "\n")
    if clearable:
        (d / "clear_refs").write_bytes(b"")
    else:
        (d / "clear_refs").mkdir(exist_ok=True)  # opening it for writing fails, as for a process gone or refused


def test_a_tree_is_armed_whole_or_not_at_all(tmp_path):
    proc = tmp_path / "proc"
    for pid in (10, 11):
        _fake_process(proc, pid, start=100 + pid)
    _fake_process(proc, 12, start=112, clearable=False)
    tracker = SoftDirtyTracker(proc=str(proc))
    out = tracker.arm([10, 11, 12])
    assert set(out) == {10, 11, 12} and all(why != "armed" for why in out.values()), out
    assert [tracker.tracked_since(pid) for pid in (10, 11, 12)] == [None, None, None]
    assert (proc / "10" / "clear_refs").read_bytes() == b"4"  # cleared all the same: only ever safe

    before = softdirty.boottime_us()
    assert tracker.arm([10, 11]) == {10: "armed", 11: "armed"}
    since = tracker.tracked_since(10)
    assert since is not None and before <= since <= softdirty.boottime_us()
    assert tracker.tracked_since(11) == since


def test_an_arming_names_its_process_by_start_time(tmp_path):
    proc = tmp_path / "proc"
    _fake_process(proc, 20, start=500)
    tracker = SoftDirtyTracker(proc=str(proc))
    assert tracker.arm([20]) == {20: "armed"}
    assert tracker.tracked_since(20) is not None
    _fake_process(proc, 20, start=900)  # the pid now names another process
    assert tracker.tracked_since(20) is None
    assert tracker.arm([21]) == {21: "no such process"}


def test_processes_gone_are_forgotten_at_the_next_arming(tmp_path):
    proc = tmp_path / "proc"
    for pid in (30, 31):
        _fake_process(proc, pid, start=700)
    tracker = SoftDirtyTracker(proc=str(proc))
    assert tracker.arm([30]) == {30: "armed"}
    (proc / "30" / "stat").unlink()  # it exited
    assert tracker.arm([31]) == {31: "armed"}
    assert tracker.tracked() == [31]


# --- on a kernel with soft-dirty bits ------------------------------------------------------------------------------

needs_soft_dirty = pytest.mark.skipif(not SoftDirtyTracker.supported(), reason="this kernel keeps no soft-dirty bits")

PAGE = os.sysconf("SC_PAGE_SIZE")
TOOL = textwrap.dedent("""
    import mmap, os, signal, sys, ctypes
    buf = mmap.mmap(-1, 64 * mmap.PAGESIZE)
    for i in range(64):
        buf[i * mmap.PAGESIZE] = 1
    print(ctypes.addressof(ctypes.c_char.from_buffer(buf)), flush=True)
    for line in sys.stdin:  # a page number: write it, then stop
        buf[int(line) * mmap.PAGESIZE] = 2
        os.kill(os.getpid(), signal.SIGSTOP)
""")


@pytest.fixture
def tool():
    p = subprocess.Popen([sys.executable, "-c", TOOL], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        addr = int(p.stdout.readline())
        yield p, addr
    finally:
        p.kill()
        p.wait()


def _dirty(pid: int, start: int, pages: int):
    return [bool(e & PM_SOFT_DIRTY) for e in pagemap_bits(pid, start, start + pages * PAGE)]


@needs_soft_dirty
def test_an_armed_process_reads_dirty_only_where_it_wrote_since(tool):
    p, addr = tool
    os.kill(p.pid, signal.SIGSTOP)
    assert wait_stopped([p.pid], 10)
    assert all(_dirty(p.pid, addr, 64))  # written since it started, never cleared
    assert SoftDirtyTracker().arm([p.pid]) == {p.pid: "armed"}
    assert not any(_dirty(p.pid, addr, 64))
    os.kill(p.pid, signal.SIGCONT)
    p.stdin.write("7\n")
    p.stdin.flush()
    assert wait_stopped([p.pid], 10)
    assert [i for i, d in enumerate(_dirty(p.pid, addr, 64)) if d] == [7]


@needs_soft_dirty
def test_a_restored_tree_keeps_its_signal_frame_span_dirty_and_its_contents(tool):
    p, addr = tool
    os.kill(p.pid, signal.SIGSTOP)
    assert wait_stopped([p.pid], 10)
    sp = max(stack_pointers(p.pid).values())
    low = sp - sp % PAGE
    # the present pages of the two from the stack pointer's up, in the stack's mapping: a tool stopped between
    # lowering its stack pointer into a page not yet mapped and touching it (a stack probe) has no page at `low`,
    # and reading there fails (EIO), as the tracker knows (it writes back present pages of writable mappings only)
    pages = []
    for begin, end in writable_mappings(p.pid):
        a, b = max(begin, low), min(end, low + 2 * PAGE)
        if a < b:
            pages += [a + i * PAGE for i, e in enumerate(pagemap_bits(p.pid, a, b)) if e & softdirty.uffd.PM_PRESENT]
    assert pages, f"no page of the stack mapped at {low:#x} or the page above"

    def contents():
        with open(f"/proc/{p.pid}/mem", "rb") as mem:
            return [os.pread(mem.fileno(), PAGE, page) for page in pages]

    before = contents()
    assert SoftDirtyTracker().arm([p.pid], restored=True) == {p.pid: "armed"}
    assert not any(_dirty(p.pid, addr, 64))  # the buffer lies elsewhere: cleared
    bits = [pagemap_bits(p.pid, page, page + PAGE)[0] for page in pages]
    assert all(e & PM_SOFT_DIRTY for e in bits), [hex(e) for e in bits]
    assert contents() == before
    assert SIGNAL_FRAMES_SPAN >= 2 * PAGE
