"""adapters/uffd.py against real processes: a stopped process is armed and stays stopped, keeps no userfaultfd of
its own, and afterwards exactly the pages it wrote read as written; re-arming protects them again; letting go makes
every page read as written; a process that is gone is reported, not raised."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ckpt_helpers import backstop, wait_for

from ckpt_agent.adapters import uffd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not uffd.DirtyTracker.supported(),
    reason="needs root and userfaultfd write-protection in async mode (Linux >= 6.7, x86_64)")

PAGE = os.sysconf("SC_PAGE_SIZE")
# 16 MiB of random anonymous memory; on `go` (holding N) it changes one byte in every Nth page, then sleeps in
# time.sleep (so it is stopped inside nanosleep, which arming must leave restartable); exits 0 on `stop`
CHILD = r"""
import ctypes, mmap, os, time
n = 16 << 20
buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.write(os.urandom(n))
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
with open("addr.tmp", "w") as fh:
    fh.write(f"{addr} {n}\n")
os.rename("addr.tmp", "addr")
done = False
while not os.path.exists("stop"):
    if os.path.exists("go") and not done:
        step = int(open("go").read())
        for off in range(0, n, 4096 * step):
            buf[off + 7] = (buf[off + 7] + 1) % 256
        done = True
        open("done", "w").close()
    time.sleep(0.01)
"""


class Child:
    def __init__(self, work: Path):
        self.work = work
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=work)
        wait_for(lambda: (work / "addr").exists() or self.proc.poll() is not None, 60, "the child's memory")
        addr, n = map(int, (work / "addr").read_text().split())
        self.start, self.end = addr, addr + n
        self.pid = self.proc.pid

    def state(self) -> str:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2]

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        wait_for(lambda: self.state() == "T", 30, "the child to stop")

    def protected(self) -> list:
        """Per page of the child's buffer: still write-protected (not written since it was armed)."""
        return [bool(b & uffd.PM_UFFD_WP) for b in uffd.pagemap_bits(self.pid, self.start, self.end)]

    def close(self) -> None:
        (self.work / "stop").touch()
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            try:
                self.proc.wait(timeout=backstop(30))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def child(tmp_path):
    c = Child(tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_exactly_the_pages_written_since_arming_read_as_written(child):
    tracker = uffd.DirtyTracker()
    try:
        child.stop()
        assert tracker.arm([child.pid]) == {child.pid: "armed"}
        # left stopped, as the engine found it: once detached, the thread goes back into its group's stop before it
        # returns to user mode (the kernel's __ptrace_unlink), so it may show as running for a moment
        wait_for(lambda: child.state() == "T", 30, "the child to be stopped again")
        fds = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
        assert not [f for f in fds if "userfaultfd" in f], fds  # its own copy was closed: CRIU could not dump it
        assert all(child.protected())

        os.kill(child.pid, signal.SIGCONT)
        (child.work / "go.tmp").write_text("16")
        (child.work / "go.tmp").rename(child.work / "go")  # whole when the child sees it (a slow guest read it empty)
        wait_for(lambda: (child.work / "done").exists(), 60, "the child's writes")
        child.stop()
        written = [i for i, p in enumerate(child.protected()) if not p]
        assert written == list(range(0, (child.end - child.start) // PAGE, 16))

        assert tracker.arm([child.pid]) == {child.pid: "armed"}  # the next dump's arming: all protected again
        assert all(child.protected())
        tracker.release()
        assert not any(child.protected())  # let go: every page reads as written
    finally:
        tracker.close()
    os.kill(child.pid, signal.SIGCONT)
    (child.work / "stop").touch()
    assert child.proc.wait(timeout=backstop(30)) == 0  # its sleep, interrupted by the arming, went on


@pytest.mark.parametrize("restored", [True, False], ids=["restored", "after-a-dump"])
def test_a_restored_process_is_armed_with_the_span_above_each_stack_pointer_reading_as_written(child, restored):
    """Signal frames the kernel may write between a restore and its SIGSTOP lie from the stack pointer up: armed as
    restored, that span reads as written (so the next dump sends it), the rest of the memory as not written."""
    tracker = uffd.DirtyTracker()
    try:
        child.stop()
        assert tracker.arm([child.pid], restored=restored) == {child.pid: "armed"}
        assert uffd.wait_stopped([child.pid], 30)
        (sp,) = uffd.stack_pointers(child.pid).values()
        low = sp - sp % PAGE
        span = uffd.pagemap_bits(child.pid, low, low + uffd.SIGNAL_FRAMES_SPAN)
        in_use = [b for b in span if b & uffd.PM_PRESENT]  # the stack's pages from the pointer up, down to its top
        assert in_use and span[0] & uffd.PM_PRESENT
        if restored:
            assert not any(b & uffd.PM_UFFD_WP for b in span)
        else:
            assert all(b & uffd.PM_UFFD_WP for b in in_use)
        assert all(child.protected())  # the buffer, far from the stack: not written since arming either way
    finally:
        tracker.close()


def test_stack_pointers_refuse_a_thread_that_is_not_stopped(child):
    with pytest.raises(uffd.TrackError, match="not stopped"):
        uffd.stack_pointers(child.pid)
    assert not uffd.wait_stopped([child.pid], 0)


def test_a_process_that_is_gone_is_reported_and_its_descriptor_let_go(tmp_path):
    tracker = uffd.DirtyTracker()
    first = Child(tmp_path)
    try:
        first.stop()
        assert tracker.arm([first.pid]) == {first.pid: "armed"}
        assert tracker.tracked() == [first.pid]
    finally:
        first.close()
    try:
        outcome = tracker.arm([first.pid])  # gone now (a reused pid is another start time: armed anew)
        assert outcome[first.pid] == "no such process"
        assert tracker.tracked() == []
    finally:
        tracker.close()


def test_only_private_anonymous_writable_mappings_are_protected(child):
    maps = Path(f"/proc/{child.pid}/maps").read_text()
    mappings = uffd.writable_mappings(child.pid)
    assert (child.start, child.end) in mappings or any(a <= child.start and child.end <= b for a, b in mappings)
    for line in maps.splitlines():
        fields = line.split()
        a, b = (int(x, 16) for x in fields[0].split("-"))
        if len(fields) > 5 and fields[5].startswith("/"):  # file-backed: left out (see writable_mappings)
            assert (a, b) not in mappings, line
        if fields[1][1] != "w" or fields[1][3] != "p":
            assert (a, b) not in mappings, line


def test_a_process_under_seccomp_is_left_alone(tmp_path):
    """A seccomp filter might kill a process for a system call it does not expect: such a process is not armed
    (here strict mode, where userfaultfd would kill it), and lives on."""
    code = ("import ctypes, os, sys\n"
            "r, w = os.pipe()\n"
            "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
            "ctypes.CDLL(None).prctl(22, 1, 0, 0, 0)\n"  # PR_SET_SECCOMP, SECCOMP_MODE_STRICT
            "os.read(r, 1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    tracker = uffd.DirtyTracker()
    try:
        assert proc.stdout.readline() == "ready\n"
        wait_for(lambda: "Seccomp:\t1" in Path(f"/proc/{proc.pid}/status").read_text(), 30, "strict mode")
        os.kill(proc.pid, signal.SIGSTOP)
        assert tracker.arm([proc.pid]) == {proc.pid: "it runs under a seccomp filter"}
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.poll() is None
    finally:
        tracker.close()
        proc.kill()
        proc.wait()


MOVER = r"""
import ctypes, os, time
n = 8 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
a = libc.mmap(None, n, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
ctypes.memset(a, 7, n)
with open("addr.tmp", "w") as fh:
    fh.write(f"{a} {n}\n")
os.rename("addr.tmp", "addr")
while not os.path.exists("go"):
    time.sleep(0.01)
far = libc.mmap(None, 2 * n, 0, 0x22, -1, 0)
moved = libc.mremap(a, n, n, 3, far)  # MREMAP_MAYMOVE | MREMAP_FIXED: the same pages at another address
with open("moved.tmp", "w") as fh:
    fh.write(f"{moved}\n")
os.rename("moved.tmp", "moved")  # whole when the test sees it (a slow guest once read it empty)
while not os.path.exists("stop"):
    time.sleep(0.01)
"""


def test_pages_moved_by_mremap_read_as_written_at_their_new_address(tmp_path):
    """Their content is not the one the previous dump saw at that address: the kernel (>= MIN_KERNEL) clears the
    bits of moved pages, so they are dumped."""
    proc = subprocess.Popen([sys.executable, "-c", MOVER], cwd=tmp_path)
    tracker = uffd.DirtyTracker()
    try:
        wait_for(lambda: (tmp_path / "addr").exists(), 60, "the child's memory")
        start, n = map(int, (tmp_path / "addr").read_text().split())
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] == "T", 30, "a stop")
        assert tracker.arm([proc.pid]) == {proc.pid: "armed"}
        assert all(b & uffd.PM_UFFD_WP for b in uffd.pagemap_bits(proc.pid, start, start + n))
        os.kill(proc.pid, signal.SIGCONT)
        (tmp_path / "go").touch()
        wait_for(lambda: (tmp_path / "moved").exists(), 60, "the move")
        moved = int((tmp_path / "moved").read_text())
        bits = uffd.pagemap_bits(proc.pid, moved, moved + n)
        assert all(b & uffd.PM_PRESENT for b in bits) and not any(b & uffd.PM_UFFD_WP for b in bits)
    finally:
        tracker.close()
        (tmp_path / "stop").touch()
        proc.kill()
        proc.wait()
