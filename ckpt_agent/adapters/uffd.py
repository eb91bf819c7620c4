"""Which pages a process wrote since its last checkpoint, on kernels without soft-dirty: userfaultfd write-protection
in async mode (the kernel's mm/userfaultfd.c; UFFD_FEATURE_WP_ASYNC, Linux >= 6.7).

CRIU finds the pages an incremental dump may skip by their soft-dirty bits, which need CONFIG_MEM_SOFT_DIRTY. This
project's CI kernel, arm64 kernels before 6.x and some cloud kernels lack it, so there every dump read every page.
Since Linux 6.7 a userfaultfd can write-protect a range in async mode: a write to a protected page clears that page's
uffd-wp bit and goes on, with no fault delivered to anyone, and /proc/PID/pagemap reports the bit (bit 57). A page
whose bit is still set was not written since it was protected. CRIU with our patch 0002 (CKPT_CRIU_WRITTEN_ONLY=1)
then dumps only the written pages and names the others as unchanged (checkpoint/streamdump.py takes them from the
previous generation); patch 0004 keeps PAGEMAP_SCAN from naming pages of mappings never protected as unchanged (Linux
7.3 reports none of them as written), and the engine arms this tracker only with a CRIU that has both.

A userfaultfd acts on the memory of the process that created it, so the engine makes the job's process create one.
While the tree is stopped after a dump, one of its threads is taken with ptrace and runs five system calls:
 1. mmap a scratch page;
 2. userfaultfd;
 3. the UFFDIO_API handshake;
 4. close (once the descriptor has been copied out with pidfd_getfd);
 5. munmap.
The syscall instruction used is one in the process's vDSO, so its code is never written. Signals are blocked
meanwhile, and the thread's registers and signal mask are put back as they were, with the same restart fix-up that
CRIU's compel applies (compel/arch/x86/src/lib/infect.c). The thread is then detached and stays stopped with its
group. A userfaultfd's ioctls act on the creator's memory from any process, so this process then registers the
writable private mappings and write-protects them. At every later dump it protects them again (with mappings that
appeared since) while the tree is stopped.

A restored tree is armed the same way before it runs (`criu restore --leave-stopped`, engine._track_restored);
there the span above each thread's stack pointer is left reading as written (SIGNAL_FRAMES_SPAN: signal frames the
kernel may have written before the stop).

Safety: a page counts as unchanged only if its bit is still set. Mappings that were never registered (created
since, or refused), processes that were not armed (new ones, or a pid reused) and everything after this process
lets go of the descriptor (closing it unregisters the ranges and clears the bits) read as written, and are dumped.
x86_64 only for now (registers and syscall numbers), Linux >= 6.13 (MIN_KERNEL); elsewhere supported() is False
and dumps read every page.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import platform
import re
import signal
import struct
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

log = logging.getLogger(__name__)

# x86_64 system calls and ptrace requests (asm/unistd_64.h, linux/ptrace.h)
SYS_CLOSE, SYS_MMAP, SYS_MUNMAP, SYS_IOCTL = 3, 9, 11, 16
SYS_USERFAULTFD, SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 323, 434, 438
PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH, PTRACE_SYSCALL = 12, 13, 17, 24
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_GETSIGMASK, PTRACE_SETSIGMASK = 0x4206, 0x4207, 0x420A, 0x420B
PTRACE_EVENT_STOP = 128
WALL = 0x40000000
# restart codes a syscall interrupted by a stop leaves in rax (include/linux/errno.h)
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516

# linux/userfaultfd.h (the 6.7+ constants are missing from older distributions' headers)
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_ASYNC = 1 << 15
FEATURES = UFFD_FEATURE_WP_ASYNC  # the kernel adds WP_UNPOPULATED to it (streamdump.ParentImage on its markers)
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


UFFDIO_API = _iowr(0xAA, 0x3F, 24)  # struct uffdio_api: api, features, ioctls
UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)  # struct uffdio_register: range (start, len), mode, ioctls
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)  # struct uffdio_writeprotect: range (start, len), mode

# 6.7 brought async mode; before 6.13 mremap() moved pages with their uffd-wp bits to the new address (the kernel's
# "mm: clear uffd-wp PTE/PMD state on mremap()"), where they would read as unchanged pages that were never there
MIN_KERNEL = (6, 13)
PM_UFFD_WP = 1 << 57  # /proc/PID/pagemap: the page is still write-protected (not written since)
PM_PRESENT = 1 << 63
# After `criu restore --leave-stopped` (engine.py arms a restored tree before it runs), a handled signal CRIU restored
# as pending, or that a restored timer raised meanwhile, is delivered before that SIGSTOP when its number is lower
# (the kernel's next_signal): the kernel writes its frame on the thread's stack or signal stack before the process
# is armed, and that write would not count. No code of the process runs before the stop, so those frames are the
# only such writes (and the rseq fields, which the kernel rewrites after every restore). Frames lie from the
# thread's stack pointer up, at most one per signal below SIGSTOP, each a few KiB with AVX-512's state (about 11 KiB
# with AMX): this much above each thread's stack pointer reads as written when a restored tree is armed.
SIGNAL_FRAMES_SPAN = 256 << 10
STOP_WAIT_SECONDS = 10.0  # for a restored tree's threads to take their SIGSTOP (no code of theirs runs before)
SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\S+)[ \t]*(.*)$", re.M)


class _Regs(ctypes.Structure):
    """struct user_regs_struct (x86_64, sys/user.h)."""

    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_ptrace.restype = ctypes.c_long
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class TrackError(Exception):
    """One process could not be armed (the reason is logged; its pages then simply read as written)."""


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise TrackError(f"{what}: {os.strerror(err)}")
    return ret


def _start_time(pid: int, proc: str = "/proc") -> Optional[int]:
    """Field 22 of /proc/PID/stat (start time in clock ticks): a pid and this name one process."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def writable_mappings(pid: int, proc: str = "/proc") -> List[Tuple[int, int]]:
    """(start, end) of the process's writable private anonymous mappings (heap, stacks, mmap'ed memory): nearly all
    of what a dump writes out. File-backed private mappings (a program's data) are left out: there a page that is
    not there may still have content (the file's), so a write-protection marker on it (which pagemap reports as a
    swapped page not written since) would not mean a zero page, as it does in anonymous memory."""
    with open(f"{proc}/{pid}/maps") as fh:
        maps = fh.read()
    return [(int(a, 16), int(b, 16)) for a, b, perms, inode, path in _MAPS.findall(maps)
            if perms[1] == "w" and perms[3] == "p" and inode == "0" and (not path or path.startswith("["))
            and path.strip() not in SPECIAL]


def _thread_states(pid: int, proc: str = "/proc") -> Dict[int, str]:
    out = {}
    try:
        tids = os.listdir(f"{proc}/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        out[int(tid)] = stat[stat.rindex(b")") + 2:][:1].decode()
    return out


def wait_stopped(pids: Iterable[int], timeout: float, proc: str = "/proc") -> bool:
    """Whether every thread of these processes is stopped (or gone) within `timeout` seconds."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        if all(st in "TtZX" for pid in pids for st in _thread_states(pid, proc).values()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def stack_pointers(pid: int, proc: str = "/proc") -> Dict[int, int]:
    """tid -> user stack pointer of each live thread of a stopped process (/proc/PID/task/TID/syscall ends with
    "SP PC"). A thread that is not stopped could move it: TrackError."""
    out = {}
    for tid, state in _thread_states(pid, proc).items():
        if state in "ZX":
            continue
        if state not in "Tt":
            raise TrackError(f"thread {tid} is not stopped (state {state})")
        try:
            with open(f"{proc}/{pid}/task/{tid}/syscall") as fh:
                fields = fh.read().split()
        except OSError:
            continue
        if len(fields) < 3:
            raise TrackError(f"thread {tid} is not stopped ({' '.join(fields)})")
        out[tid] = int(fields[-2], 16)
    return out


def pagemap_bits(pid: int, start: int, end: int, proc: str = "/proc") -> List[int]:
    """The raw /proc/PID/pagemap entry of every page in [start, end) (tests and diagnostics)."""
    page = os.sysconf("SC_PAGE_SIZE")
    n = (end - start) // page
    with open(f"{proc}/{pid}/pagemap", "rb") as fh:
        fh.seek(start // page * 8)
        data = fh.read(n * 8)
    return list(struct.unpack(f"<{n}Q", data))


class _Injector:
    """System calls run by one stopped thread of another process, through ptrace (see the module's docstring)."""

    def __init__(self, pid: int, proc: str = "/proc"):
        self.pid = pid
        self.proc = proc
        self.tid = self._live_thread()
        self.saved: Optional[_Regs] = None
        self.mask = ctypes.c_uint64(0)
        self.deliver = 0  # a signal the first stop reported, given back on detach
        self.site = 0

    def _live_thread(self) -> int:
        """The leader, or another thread when the leader has exited (a zombie leader cannot be traced)."""
        states = _thread_states(self.pid, self.proc)
        for tid in [self.pid] + sorted(states):
            if states.get(tid, "Z") not in "ZX":
                return tid
        raise TrackError("no live thread")

    def _wait(self) -> int:
        _pid, status = os.waitpid(self.tid, WALL)
        if not os.WIFSTOPPED(status):
            raise TrackError(f"thread {self.tid} ended while being armed")
        return status

    def __enter__(self) -> _Injector:
        _check(_ptrace(PTRACE_SEIZE, self.tid, None, None), f"ptrace seize {self.tid}")
        try:
            _check(_ptrace(PTRACE_INTERRUPT, self.tid, None, None), "ptrace interrupt")
            status = self._wait()
            sig = os.WSTOPSIG(status)
            if status >> 16 != PTRACE_EVENT_STOP and sig not in (signal.SIGTRAP, signal.SIGSTOP):
                self.deliver = sig  # a signal-delivery stop: the signal is handed back at detach
            _check(_ptrace(PTRACE_GETSIGMASK, self.tid, ctypes.c_void_p(8), ctypes.byref(self.mask)),
                   "ptrace getsigmask")
            block = ctypes.c_uint64(0xFFFFFFFFFFFFFFFF)
            _check(_ptrace(PTRACE_SETSIGMASK, self.tid, ctypes.c_void_p(8), ctypes.byref(block)), "setsigmask")
            regs = _Regs()
            _check(_ptrace(PTRACE_GETREGS, self.tid, None, ctypes.byref(regs)), "ptrace getregs")
            self.saved = _Regs.from_buffer_copy(regs)
            self._fix_restart(self.saved)
            self.site = self._syscall_site(regs)
        except BaseException:
            self._detach()
            raise
        return self

    @staticmethod
    def _fix_restart(regs: _Regs) -> None:
        """A thread stopped inside an interrupted syscall holds a restart code: turn it into the state that re-runs
        the syscall (or returns EINTR for restart_syscall), since setting the registers back bypasses the kernel's
        own restart logic."""
        if ctypes.c_longlong(regs.orig_rax).value < 0:
            return
        code = -ctypes.c_int(regs.rax & 0xFFFFFFFF).value
        if code in (ERESTARTNOHAND, ERESTARTSYS, ERESTARTNOINTR):
            regs.rax = regs.orig_rax
            regs.rip -= 2
        elif code == ERESTART_RESTARTBLOCK:
            regs.rax = ctypes.c_ulonglong(-errno.EINTR).value

    def _syscall_site(self, regs: _Regs) -> int:
        """The address of a `syscall` instruction in the process's vDSO."""
        with open(f"{self.proc}/{self.pid}/maps") as fh:
            maps = fh.read()
        for a, b, _perms, _inode, path in _MAPS.findall(maps):
            if path.strip() == "[vdso]":
                start, end = int(a, 16), int(b, 16)
                with open(f"{self.proc}/{self.pid}/mem", "rb") as mem:
                    mem.seek(start)
                    code = mem.read(end - start)
                at = code.find(b"\x0f\x05")
                if at >= 0:
                    return start + at
        raise TrackError("no syscall instruction in the vDSO")

    def call(self, nr: int, *args: int) -> int:
        regs = _Regs.from_buffer_copy(self.saved)
        regs.rax, regs.orig_rax, regs.rip = nr, ctypes.c_ulonglong(-1).value, self.site
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, ctypes.c_ulonglong(value).value)
        _check(_ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(regs)), "ptrace setregs")
        for stop in ("entry", "exit"):
            for _ in range(4):  # a group-stop trap still pending (seizing a stopped task queues one) comes first
                _check(_ptrace(PTRACE_SYSCALL, self.tid, None, None), "ptrace syscall")
                status = self._wait()
                if status >> 16 != PTRACE_EVENT_STOP:
                    break
            if os.WSTOPSIG(status) != signal.SIGTRAP or status >> 16:
                raise TrackError(f"syscall {nr}: unexpected stop {status:#x} at {stop}")
        _check(_ptrace(PTRACE_GETREGS, self.tid, None, ctypes.byref(regs)), "ptrace getregs")
        return ctypes.c_longlong(regs.rax).value

    def write(self, addr: int, data: bytes) -> None:
        fd = os.open(f"{self.proc}/{self.pid}/mem", os.O_RDWR)
        try:
            if os.pwrite(fd, data, addr) != len(data):
                raise TrackError("short write to the scratch page")
        finally:
            os.close(fd)

    def _detach(self) -> None:
        try:
            if self.saved is not None:
                _ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(self.saved))
                _ptrace(PTRACE_SETSIGMASK, self.tid, ctypes.c_void_p(8), ctypes.byref(self.mask))
        finally:
            _ptrace(PTRACE_DETACH, self.tid, None, ctypes.c_void_p(self.deliver))

    def __exit__(self, *exc) -> None:
        self._detach()


@dataclass
class _Held:
    fd: int  # our copy of the process's userfaultfd
    start: int  # the process's start time: a reused pid is another process


def _ioctl(fd: int, request: int, *words: int) -> None:
    buf = bytearray(struct.pack(f"<{len(words)}Q", *words))
    fcntl.ioctl(fd, request, buf)


class DirtyTracker:
    """One userfaultfd per tracked process, held by this (long-lived) process: the agent's engine, or `ckpt run`'s."""

    _supported: Optional[bool] = None
    MARKS_INHERITED = False  # a child is not armed (no UFFD_FEATURE_EVENT_FORK): its pages read as written
    WHOLE_HUGE_PAGES = False  # async mode splits a protected huge page at its first write (mm/memory.c wp_huge_pmd)

    def __init__(self, proc: str = "/proc"):
        self.proc = proc
        self._held: Dict[int, _Held] = {}

    @classmethod
    def supported(cls) -> bool:
        """x86_64, Linux >= MIN_KERNEL, and this kernel's userfaultfd accepts write-protection in async mode (probed
        once, in this process: the target makes the same call)."""
        if cls._supported is None:
            cls._supported = platform.machine() == "x86_64" and _kernel() >= MIN_KERNEL and _probe()
        return cls._supported

    def arm(self, pids: Iterable[int], restored: bool = False) -> Dict[int, str]:
        """Write-protect the writable private memory of these stopped processes: pid -> "armed", or why not. The
        processes stay stopped. Never raises for one process: its descriptor is let go, and its pages then read as
        written.

        restored: the processes were just restored with --leave-stopped; the SIGNAL_FRAMES_SPAN above each
        thread's stack pointer is left reading as written (signal frames the kernel may have written before the
        stop)."""
        pids = list(pids)
        self._forget_gone()
        out = {}
        for pid in pids:
            try:
                self._arm_one(pid, restored)
                out[pid] = "armed"
            except (TrackError, OSError) as e:
                self.release([pid])
                out[pid] = str(e)
                log.debug("dirty tracking: process %d not armed: %s", pid, e)
        return out

    def _arm_one(self, pid: int, restored: bool = False) -> None:
        start = _start_time(pid, self.proc)
        if start is None:
            raise TrackError("no such process")
        held = self._held.get(pid)
        if held is not None and held.start != start:
            self.release([pid])
            held = None
        if held is None:
            held = self._held[pid] = _Held(self._adopt(pid), start)
        protected: List[Tuple[int, int]] = []
        for begin, end in writable_mappings(pid, self.proc):
            try:  # registering a range again with the same descriptor and mode is a no-op
                _ioctl(held.fd, UFFDIO_REGISTER, begin, end - begin, UFFDIO_REGISTER_MODE_WP, 0)
                _ioctl(held.fd, UFFDIO_WRITEPROTECT, begin, end - begin, UFFDIO_WRITEPROTECT_MODE_WP)
                protected.append((begin, end))
            except OSError as e:  # in use by the job's own userfaultfd, a special mapping, gone: read as written
                log.debug("dirty tracking: process %d, %#x-%#x not protected: %s", pid, begin, end, e)
        if not protected:
            raise TrackError("no mapping could be protected")
        if restored:
            self._unprotect_signal_frames(pid, held.fd, protected)

    def _unprotect_signal_frames(self, pid: int, fd: int, protected: List[Tuple[int, int]]) -> None:
        """Make SIGNAL_FRAMES_SPAN above each thread's stack pointer read as written. The injected thread goes back
        into its group's stop once detached (see _Injector), so the stop is waited for first."""
        if not wait_stopped([pid], STOP_WAIT_SECONDS, self.proc):
            raise TrackError("not stopped again after arming")
        page = os.sysconf("SC_PAGE_SIZE")
        for sp in stack_pointers(pid, self.proc).values():
            low = sp - sp % page
            high = low + SIGNAL_FRAMES_SPAN + page
            for begin, end in protected:
                a, b = max(low, begin), min(high, end)
                if a < b:
                    _ioctl(fd, UFFDIO_WRITEPROTECT, a, b - a, 0)

    def _adopt(self, pid: int) -> int:
        """Make the process create a userfaultfd, take a copy of it, and close the process's own."""
        if _seccomp_filtered(pid, self.proc):  # a filter might kill it for a system call it does not expect
            raise TrackError("it runs under a seccomp filter")
        with _Injector(pid, self.proc) as inj:
            page = os.sysconf("SC_PAGE_SIZE")
            prot, flags = 3, 0x22  # PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
            scratch = inj.call(SYS_MMAP, 0, page, prot, flags, ctypes.c_ulonglong(-1).value, 0)
            if -4096 < scratch < 0:
                raise TrackError(f"mmap in the process: {os.strerror(-scratch)}")
            theirs = -1
            try:
                theirs = inj.call(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
                if theirs < 0:
                    raise TrackError(f"userfaultfd in the process: {os.strerror(-theirs)}")
                inj.write(scratch, struct.pack("<3Q", UFFD_API, FEATURES, 0))
                ret = inj.call(SYS_IOCTL, theirs, UFFDIO_API, scratch)
                if ret < 0:
                    raise TrackError(f"UFFDIO_API in the process: {os.strerror(-ret)}")
                pidfd = _check(_syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0)), "pidfd_open")
                try:
                    return _check(_syscall(SYS_PIDFD_GETFD, ctypes.c_int(pidfd), ctypes.c_int(theirs),
                                           ctypes.c_uint(0)), "pidfd_getfd")
                finally:
                    os.close(pidfd)
            finally:
                if theirs >= 0:
                    inj.call(SYS_CLOSE, theirs)
                inj.call(SYS_MUNMAP, scratch, page)

    def _forget_gone(self) -> None:
        gone = [pid for pid, held in self._held.items() if _start_time(pid, self.proc) != held.start]
        if gone:
            self.release(gone)

    def release(self, pids: Optional[Iterable[int]] = None) -> None:
        """Let go of these processes' descriptors (all when None): their ranges are unregistered, and all their
        pages read as written again."""
        for pid in list(self._held) if pids is None else list(pids):
            held = self._held.pop(pid, None)
            if held is not None:
                os.close(held.fd)

    def tracked(self) -> List[int]:
        return sorted(self._held)

    def close(self) -> None:
        self.release()


def _kernel() -> Tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _seccomp_filtered(pid: int, proc: str = "/proc") -> bool:
    with open(f"{proc}/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Seccomp:"):
                return line.split()[1] != "0"
    return False


def _probe() -> bool:
    fd = _syscall(SYS_USERFAULTFD, ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY))
    if fd < 0:
        log.debug("dirty tracking: userfaultfd: %s", os.strerror(ctypes.get_errno()))
        return False
    try:
        _ioctl(fd, UFFDIO_API, UFFD_API, FEATURES, 0)
        return True
    except OSError as e:
        log.debug("dirty tracking: this kernel has no userfaultfd write-protection in async mode: %s", e)
        return False
    finally:
        os.close(fd)
