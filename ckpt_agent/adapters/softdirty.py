"""Which pages a process wrote since its last checkpoint, from the kernel's soft-dirty bits: the tracker for kernels
that have soft-dirty (CONFIG_MEM_SOFT_DIRTY) but not userfaultfd's async write-protection (adapters/uffd.py, Linux >=
6.13 here).

The kernels ParallelCluster nodes run today are such kernels (Amazon Linux 2023's 6.1, RHEL/Rocky 9's 5.14, Ubuntu
22.04's 5.15 and 6.x): x86_64 builds carry soft-dirty, which CRIU's own incremental dumps rely on. Writing "4" to
/proc/PID/clear_refs clears every soft-dirty bit of the process and write-protects its pages; the kernel sets a
page's bit again at its next write (and on every page of a mapping made, grown or moved since, and on every page
faulted in anew). /proc/PID/pagemap reports the bit (bit 55).

arm() clears the bits of the stopped tree after a dump, or after a restore before it runs, as the uffd tracker
write-protects there. CRIU with patch 0003 (CKPT_CRIU_WRITTEN_ONLY=soft-dirty, adapters/criu.py) then dumps only the
pages whose bit is set; the others are PE_PARENT holes that checkpoint/streamdump.py takes from the previous
generation. Unlike a userfaultfd's marks, soft-dirty bits are copied by fork(): a child started since the arming
could carry clean bits for pages the previous dump holds for no process of its pid. So the dump is told when the
arming began (CKPT_CRIU_TRACKED_SINCE, microseconds of CLOCK_BOOTTIME, the clock of /proc/PID/stat's start time), and
CRIU dumps every page of a process started at or after it (patch 0003, as its own pid-reuse check does).

Granularity: a write to one 4 KiB page of a transparent huge page marks all 512 of its pages (the kernel's
do_huge_pmd_wp_page keeps the huge page whole), so with THP on, CRIU sends far more than was written. The pages it
sends are then also looked up by content in the previous generation (WHOLE_HUGE_PAGES: streamdump's compare_written),
so what is stored stays what changed; what CRIU reads is at worst every page, as without tracking.

Safety: a page counts as unchanged only if its bit is still clear, and not clearing is always safe (bits only
accumulate). Unsafe would be a clearing with no dump of the same moment behind it, so arm() reports every process
as not armed when one of them could not be cleared (the engine then records nothing and the next dump reads every
page), and the engine uses a clearing only against the generation whose dump (or restore) preceded it. One thing
this tracker cannot see: the job's own processes may write "4" to their own clear_refs (CRIU run inside the job
does); pages written before such a clearing would then read as unchanged. No EDA tool is known to do so; a job
that does should set `checkpoint.dirty_tracking: false`.

Restored trees: the kernel may write signal frames on a thread's stack between CRIU's restore of the memory and the
stop (see uffd.SIGNAL_FRAMES_SPAN); after clearing, the present pages of that span above each thread's stack pointer
are written back with their own bytes through /proc/PID/mem, which sets their bits (the write faults on the
write-protected page like any other), so they are dumped next time.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import time
from typing import Dict, Iterable, List, Optional, Tuple

from ckpt_agent.adapters import uffd
from ckpt_agent.adapters.uffd import TrackError

log = logging.getLogger(__name__)

CLEAR_SOFT_DIRTY = b"4"  # fs/proc/task_mmu.c: CLEAR_REFS_SOFT_DIRTY
PM_SOFT_DIRTY = 1 << 55  # Documentation/admin-guide/mm/pagemap.rst


def boottime_us() -> int:
    """Microseconds of CLOCK_BOOTTIME: the clock of /proc/PID/stat's start time and of CRIU's dump_uptime."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000


class SoftDirtyTracker:
    """Clears the soft-dirty bits of stopped trees; keeps, per process armed, when its tree's arming began."""

    _supported: Optional[bool] = None
    MARKS_INHERITED = True  # fork() copies soft-dirty bits: a dump needs tracked_since() (engine.py)
    # a write to one page of a transparent huge page marks all 512 (the kernel's do_huge_pmd_wp_page): the pages CRIU
    # sends are compared by content too (streamdump.StreamDump's compare_written), so only those changed are stored
    WHOLE_HUGE_PAGES = True

    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self._since: Dict[int, Tuple[int, int]] = {}  # pid -> (its start time, CLOCK_BOOTTIME us the arming began)

    @classmethod
    def supported(cls) -> bool:
        """This kernel keeps soft-dirty bits (probed once, on a page of this process)."""
        if cls._supported is None:
            cls._supported = _probe()
        return cls._supported

    def arm(self, pids: Iterable[int], restored: bool = False) -> Dict[int, str]:
        """Clear the soft-dirty bits of these stopped processes: pid -> "armed", or why not. A tree is armed as a
        whole or not at all: when one process could not be cleared, every one reads as not armed. Never raises.

        restored: the processes were just restored with --leave-stopped; the uffd.SIGNAL_FRAMES_SPAN above each
        thread's stack pointer is made to read as written."""
        pids = list(pids)
        self._forget_gone()
        since = boottime_us()
        out: Dict[int, str] = {}
        for pid in pids:
            try:
                start = uffd._start_time(pid, self.proc)
                if start is None:
                    raise TrackError("no such process")
                with open(f"{self.proc}/{pid}/clear_refs", "wb", buffering=0) as fh:
                    fh.write(CLEAR_SOFT_DIRTY)
                if restored:
                    self._mark_signal_frames(pid)
                out[pid] = "armed"
                self._since[pid] = (start, since)
            except (TrackError, OSError) as e:
                out[pid] = str(e) or type(e).__name__
                log.debug("dirty tracking: process %d not armed: %s", pid, e)
        failed = {pid: why for pid, why in out.items() if why != "armed"}
        if failed:
            self.release(pids)
            return {pid: failed.get(pid, "another process of its tree was not armed") for pid in pids}
        return out

    def tracked_since(self, pid: int) -> Optional[int]:
        """When the arming that included this process began (CLOCK_BOOTTIME us), if it is the same process."""
        entry = self._since.get(pid)
        if entry is None or uffd._start_time(pid, self.proc) != entry[0]:
            return None
        return entry[1]

    def _mark_signal_frames(self, pid: int) -> None:
        """Make the present pages of uffd.SIGNAL_FRAMES_SPAN above each thread's stack pointer read as written: each is
        written back with its own first byte (the process is stopped: nothing else writes meanwhile)."""
        if not uffd.wait_stopped([pid], uffd.STOP_WAIT_SECONDS, self.proc):
            raise TrackError("not stopped")
        page = mmap.PAGESIZE
        mappings = uffd.writable_mappings(pid, self.proc)
        spans = []
        for sp in uffd.stack_pointers(pid, self.proc).values():
            low = sp - sp % page
            high = low + uffd.SIGNAL_FRAMES_SPAN + page
            spans += [(max(low, begin), min(high, end)) for begin, end in mappings if max(low, begin) < min(high, end)]
        if not spans:
            return
        fd = os.open(f"{self.proc}/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            for a, b in spans:
                for i, entry in enumerate(uffd.pagemap_bits(pid, a, b, self.proc)):
                    if entry & uffd.PM_PRESENT:  # a page not there is not written back (that would allocate it)
                        addr = a + i * page
                        os.pwrite(fd, os.pread(fd, 1, addr), addr)
        finally:
            os.close(fd)

    def _forget_gone(self) -> None:
        """Drop the processes that exited (or whose pid names another now): a node agent outlives many jobs."""
        for pid, (start, _since) in list(self._since.items()):
            if uffd._start_time(pid, self.proc) != start:
                del self._since[pid]

    def release(self, pids: Optional[Iterable[int]] = None) -> None:
        """Forget these processes (all when None): their next dump reads every page."""
        for pid in list(self._since) if pids is None else list(pids):
            self._since.pop(pid, None)

    def tracked(self) -> List[int]:
        return sorted(self._since)

    def close(self) -> None:
        self.release()


def _probe() -> bool:
    """Clear this process's bits, write one of two pages: only that one may read soft-dirty."""
    buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    try:
        view = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(view)
        del view  # the mapping stays; only its address is needed
        buf[0] = buf[mmap.PAGESIZE] = 1  # both present
        with open("/proc/self/clear_refs", "wb", buffering=0) as fh:
            fh.write(CLEAR_SOFT_DIRTY)
        buf[0] = 2
        written, untouched = uffd.pagemap_bits(os.getpid(), addr, addr + 2 * mmap.PAGESIZE)
        ok = bool(written & PM_SOFT_DIRTY) and not untouched & PM_SOFT_DIRTY
        if not ok:
            log.debug("dirty tracking: this kernel keeps no soft-dirty bits")
        return ok
    except (OSError, ValueError, struct.error) as e:
        log.debug("dirty tracking: soft-dirty probe: %s", e)
        return False
    finally:
        buf.close()
