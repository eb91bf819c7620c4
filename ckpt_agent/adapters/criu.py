"""The CRIU adapter: dump and restore a process tree, with the options this product relies on.

Facts behind the options (measured, see the project's CRIU field notes):
- `--leave-stopped` at dump: the tree stays frozen so the files it writes can be captured as of the same instant.
- `--manage-cgroups=ignore`: a restored tree stays in the caller's cgroup (the new Slurm job's), not the old one's.
- `--tcp-close`: a connection to a license server is restored closed; the tool reconnects from the new address.
- `--ghost-limit`: deleted-but-open temp files larger than CRIU's 1 MiB default are saved too.
- `--cpu-cap=fpu,ins`: the image records the CPU's features; restore on a CPU lacking one is refused, not a crash.
- restore with `-d -S --pidfile`: the restored root becomes a sibling of CRIU (our child) and CRIU returns at once;
  in the foreground CRIU would return 0 whatever the tool's exit status.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from ckpt_agent.errors import CommandError, CriuError, IncompatibleCpuError
from ckpt_agent.util import proc
from ckpt_agent.util.usercreds import root_has_cap_sys_resource

log = logging.getLogger(__name__)

MIN_VERSION = (4, 2, 1)  # < 4.2 cannot dump any INET socket on kernels >= 6.16; 3.17 fails on >= 6.13 (vDSO)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CPU_CAPS = "fpu,ins"
RLIMITS_PATCH = "ckpt-agent-0001-rlimits-from-proc"  # bootstrap/patches/criu-4.2.1/0001-rlimits-from-proc.patch
WRITTEN_ONLY_PATCH = "ckpt-agent-0002-written-only"  # bootstrap/patches/criu-4.2.1/0002-written-only.patch
WRITTEN_ONLY_ENV = "CKPT_CRIU_WRITTEN_ONLY"  # set to 1: pages still userfaultfd-write-protected become PE_PARENT holes
SOFT_DIRTY_PATCH = "ckpt-agent-0003-soft-dirty"  # bootstrap/patches/criu-4.2.1/0003-soft-dirty.patch
# bootstrap/patches/criu-4.2.1/0004-written-needs-wp.patch: without it, PAGEMAP_SCAN on Linux 7.3 made patch 0002 take
# the written pages of mappings userfaultfd never protected as unchanged
WRITTEN_NEEDS_WP_PATCH = "ckpt-agent-0004-written-needs-wp"
WRITTEN_SOFT_DIRTY = "soft-dirty"  # WRITTEN_ONLY_ENV's value for patch 0003: pages whose soft-dirty bit is clear
TRACKED_SINCE_ENV = "CKPT_CRIU_TRACKED_SINCE"  # patch 0003: processes started since (CLOCK_BOOTTIME us) dump every page

_PAGEMAP_MAGIC = 0x56084025
_PE_PARENT = 1 << 0
_PE_PRESENT = 1 << 2
# The usual pagemap entry as CRIU 4.x lays it out (PagemapReader): its size (4 bytes, 14 or 15), 0x08 and the vaddr's
# varint in 7 bytes (a user-space address from 2^42 to 2^49), 0x10 0x00 (compat_nr_pages 0), 0x20 and the flags in
# one byte, 0x28 and nr_pages' varint in 1 or 2 bytes. Read as three little-endian words: the size; x, 0x08 and the
# vaddr's bytes (all but the last with their continuation bit); y, the rest from 0x10 on (and what follows the entry,
# not looked at). The flags byte is the entry's 16th (offset 15).
_V4_WORDS = struct.Struct("<IQQ").unpack_from
_V4_X_MASK, _V4_X = 0x80808080808080FF, 0x0080808080808008
_V4_Y_MASK, _V4_Y = 0xFF80FFFFFF, 0x2800200010
_CORE_MAGIC = 0x55053847  # criu/include/magic.h
TASK_STOPPED = 0x03  # criu/include/pid.h (COMPEL_TASK_STOPPED): task_core_entry.task_state of a stopped process
CORE_IMAGE = re.compile(r"core-(\d+)\.img$")  # one per thread, named by its pid in the dumped tree's namespace


class Criu:
    def __init__(self, binary: str = "criu", run: Callable = proc.run):
        self.binary = binary
        self.run = run
        self._version: Optional[str] = None

    def _version_text(self) -> str:
        if self._version is None:
            try:
                self._version = self.run([self.binary, "--version"], timeout=20).stdout
            except CommandError as e:
                raise CriuError(f"CRIU not usable ({self.binary}): {e}") from e
        return self._version

    def version(self) -> str:
        out = self._version_text()
        m = re.search(r"Version:\s*(\S+)", out)
        if not m:
            raise CriuError(f"cannot tell the version of {self.binary} from: {out.strip()[:80]}")
        return m.group(1)

    def patches(self) -> List[str]:
        """The patches this project carries that the binary was built with (bootstrap/patches/), from the
        `Patches:` line each of them adds to `criu --version`."""
        m = re.search(r"^Patches:\s*(.+)$", self._version_text(), re.M)
        return m.group(1).split() if m else []

    def can_dump_other_users(self) -> bool:
        """CRIU reads every task's resource limits with prlimit(); for another user's task that needs
        CAP_SYS_RESOURCE, which root lacks in some containers and microVMs. Our patch 0001 reads them from
        /proc/PID/limits instead, so a patched CRIU dumps ordinary users' jobs either way."""
        return root_has_cap_sys_resource() or RLIMITS_PATCH in self.patches()

    def can_dump_written_only(self) -> bool:
        """Whether this CRIU carries our patch 0002: with WRITTEN_ONLY_ENV=1 a dump writes only the pages written
        since adapters/uffd.py write-protected them, the others as PE_PARENT holes (dirty tracking without
        soft-dirty)."""
        return WRITTEN_ONLY_PATCH in self.patches()

    def can_dump_uffd_written(self) -> bool:
        """Whether this CRIU may dump only the pages userfaultfd saw written: patch 0002 with patch 0004, which
        counts a page as unchanged only in a mapping registered for the write-protection (PAGE_IS_WPALLOWED)."""
        return WRITTEN_NEEDS_WP_PATCH in self.patches() and self.can_dump_written_only()

    def can_dump_soft_dirty_written(self) -> bool:
        """Whether this CRIU carries our patch 0003: the same written-only dump from soft-dirty bits that
        adapters/softdirty.py cleared (kernels with soft-dirty but without userfaultfd's async write-protection)."""
        return SOFT_DIRTY_PATCH in self.patches() and self.can_dump_written_only()

    def require_version(self) -> str:
        ver = self.version()
        parts = tuple(int(p) for p in re.findall(r"\d+", ver)[:3])
        if parts < MIN_VERSION:
            need = ".".join(map(str, MIN_VERSION))
            raise CriuError(f"{self.binary} is CRIU {ver}; need >= {need} (run bootstrap/install-criu.sh)")
        return ver

    def check(self) -> None:
        try:
            self.run([self.binary, "check"], timeout=60)
        except CommandError as e:
            raise CriuError(f"'criu check' fails on this machine: {e}") from e

    def has_feature(self, feature: str) -> bool:
        try:
            self.run([self.binary, "check", "--feature", feature], timeout=60)
            return True
        except CommandError:
            return False

    def can_stream(self) -> bool:
        """Whether this CRIU was built with the image streamer (`--stream`; every 4.x build has it, but a build
        without it would fail every dump)."""
        return "--stream" in self._help_text()

    def _help_text(self) -> str:
        if getattr(self, "_help", None) is None:
            try:
                self._help = self.run([self.binary, "--help"], timeout=20).stdout
            except CommandError:
                self._help = ""
        return self._help

    def dump(
        self,
        pid: int,
        images_dir: str,
        *,
        leave_stopped: bool = True,
        tcp_close: bool = True,
        ghost_limit: str = "1G",
        timeout: Optional[float] = None,
        keep_fds: Sequence[int] = (),
        stream: bool = False,
        written_only: bool = False,
        tracked_since_us: Optional[int] = None,
    ) -> None:
        """keep_fds: descriptors CRIU inherits and holds until it exits (the dump guard's pipe, see engine.py).
        stream: images go to the streamer listening in images_dir (checkpoint/streamdump.py), not into files.
        written_only: pages not written since they were write-protected (adapters/uffd.py) are PE_PARENT holes in
        the pagemaps (patch 0002; the caller resolves them from the previous generation).
        tracked_since_us: with written_only, the pages are those whose soft-dirty bits adapters/softdirty.py
        cleared from this time on (CLOCK_BOOTTIME microseconds; patch 0003): a process started since is dumped whole."""
        argv = [
            self.binary, "dump", "-t", str(pid), "-D", images_dir, "-o", "dump.log", "-v2",
            "--manage-cgroups=ignore", "--ext-unix-sk", "--file-locks", "--ghost-limit", ghost_limit,
            f"--cpu-cap={CPU_CAPS}",
        ]
        if leave_stopped:
            argv.append("--leave-stopped")
        if tcp_close:
            argv.append("--tcp-close")
        if stream:
            argv.append("--stream")
        env = None
        if written_only and tracked_since_us is not None:
            env = {**os.environ, WRITTEN_ONLY_ENV: WRITTEN_SOFT_DIRTY, TRACKED_SINCE_ENV: str(int(tracked_since_us))}
        elif written_only:
            env = {**os.environ, WRITTEN_ONLY_ENV: "1"}
        self._run_logged(argv, images_dir, "dump.log", timeout, pass_fds=keep_fds, env=env)

    def restore(
        self,
        images_dir: str,
        *,
        pidfile: str,
        inherit_fds: Optional[Dict[int, str]] = None,
        tcp_close: bool = True,
        timeout: Optional[float] = None,
        sibling: bool = True,
        cgroup_pid: Optional[int] = None,
        stream: bool = False,
        leave_stopped: bool = False,
    ) -> int:
        """Restore detached; return the restored root's host pid.

        sibling=True (a root wrapper restoring its own job): the restored root becomes our child, to be waited for.
        sibling=False (the agent restoring for a user): it is reparented to the system's init once CRIU exits.
        cgroup_pid: CRIU runs in that process's cgroups, so with --manage-cgroups=ignore the tree lands there.
        leave_stopped: every restored process gets SIGSTOP before CRIU lets go of it (cr-restore.c's
        finalize_restore), so none runs code of its own until the caller sends SIGCONT (engine.py arms dirty
        tracking meanwhile).
        """
        argv = [
            self.binary, "restore", "-D", images_dir, "-o", "restore.log", "-v2", "-d",
            "--pidfile", pidfile, "--manage-cgroups=ignore", "--ext-unix-sk", "--file-locks",
            f"--cpu-cap={CPU_CAPS}",
        ]
        if sibling:
            argv.append("-S")
        if stream:
            argv.append("--stream")
        if leave_stopped:
            argv.append("--leave-stopped")
        if tcp_close:
            argv.append("--tcp-close")
        fds: List[int] = []
        for fd, key in sorted((inherit_fds or {}).items()):
            argv += ["--inherit-fd", f"fd[{fd}]:{key}"]
            fds.append(fd)
        if cgroup_pid:
            argv = [sys.executable, "-m", "ckpt_agent.util.execas", "--cgroup-of", str(cgroup_pid), "--", *argv]
        self._run_logged(argv, images_dir, "restore.log", timeout, pass_fds=fds)
        try:
            with open(pidfile, encoding="ascii") as fh:
                return int(fh.read().strip())
        except (OSError, ValueError) as e:
            raise CriuError(f"CRIU restored but wrote no pid to {pidfile}") from e

    def _run_logged(
        self, argv: List[str], images_dir: str, log_name: str, timeout: Optional[float], pass_fds: Sequence[int] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        try:
            if env is None:
                self.run(argv, timeout=timeout, pass_fds=pass_fds)
            else:
                self.run(argv, timeout=timeout, pass_fds=pass_fds, env=env)
        except CommandError as e:
            detail = _log_errors(os.path.join(images_dir, log_name)) or str(e)
            if "Can't get rlimit" in detail:
                detail += (" (CRIU reads the limits of another user's processes with prlimit(), which needs "
                           "CAP_SYS_RESOURCE: root on this machine lacks it; install CRIU with "
                           "bootstrap/install-criu.sh, whose patch 0001 reads them from /proc/PID/limits)")
            action = "dump" if "dump" in argv else "restore"
            kept = _keep_log(os.path.join(images_dir, log_name))
            if action == "restore" and _CPU_REFUSAL.search(detail):
                raise IncompatibleCpuError(
                    "this machine's CPU lacks features the checkpointed tool uses; restore it on the same instance "
                    f"family: {detail} (log: {kept})"
                ) from e
            raise CriuError(f"criu {action} failed: {detail} (log: {kept})") from e


# A restore's first error from CRIU's CPU check (criu/arch/<arch>/cpu.c, cpu_validate_cpuinfo(), which `criu restore`
# runs with --cpu-cap before it restores anything): this machine's CPU lacks what the image records (x86: an
# instruction set, an FPU feature, xsave features or sizes).
_CPU_REFUSAL = re.compile(r"Error \(criu/(?:arch/[\w-]+/)?cpu\.c:\d+\)")

# Logged on machines whose root lacks CAP_SYS_RESOURCE, then worked around by CRIU: never the cause of a failure.
_HARMLESS = ("Can't setup RLIMIT_NOFILE",)


def _log_errors(path: str) -> str:
    """The first error CRIU logged, which names the real cause (later ones are consequences)."""
    try:
        with open(path, errors="replace") as fh:
            for line in fh:
                if "Error (" in line and not any(h in line for h in _HARMLESS):
                    return re.sub(r"^\(\s*[\d.]+\)\s*", "", line.strip())
    except OSError:
        pass
    return ""


FAILED_LOG_DIR = "/var/tmp/ckpt-agent/failed"


def _keep_log(path: str) -> str:
    """Images are discarded after a failure; the log is kept where an admin finds it."""
    try:
        os.makedirs(FAILED_LOG_DIR, mode=0o700, exist_ok=True)
        dest = os.path.join(FAILED_LOG_DIR, f"{os.path.basename(os.path.dirname(path))}.{os.path.basename(path)}")
        with open(path, "rb") as src, open(dest, "wb") as out:
            out.write(src.read())
        return dest
    except OSError:
        return path


def read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    """A protobuf varint at `pos`: (value, position after it); ValueError when `buf` ends inside it."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(msg: bytes) -> Dict[int, int]:
    """The varint fields of one protobuf message (a pagemap entry: tens of thousands an image, so decoded inline)."""
    out: Dict[int, int] = {}
    i, n = 0, len(msg)
    try:
        while i < n:
            key = msg[i]
            if key & 0x80:
                key, i = read_varint(msg, i)
            else:
                i += 1
            if key & 7 != 0:
                raise ValueError("unexpected wire type in pagemap image")
            value = shift = 0
            while True:
                b = msg[i]
                i += 1
                value |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
                if shift > 63:
                    raise ValueError("varint too long")
            out[key >> 3] = value
    except IndexError:
        raise ValueError("truncated varint") from None
    return out


def _protobuf_fields(msg: bytes) -> Iterator[Tuple[int, Union[int, bytes, None]]]:
    """(field number, value) of each field of protobuf `msg`: an int for a varint, the bytes of a length-delimited
    one, None for fixed-width ones (not needed here). ValueError when `msg` is not whole."""
    i, n = 0, len(msg)
    while i < n:
        key, i = read_varint(msg, i)
        wire, value = key & 7, None
        if wire == 0:
            value, i = read_varint(msg, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = read_varint(msg, i)
            value, i = msg[i:i + size], i + size
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if i > n:
            raise ValueError("truncated field")
        yield key >> 3, value


def _head_entry(image: bytes, magic: int, kind: str, entry: str = "entry") -> Tuple[bytes, int]:
    """(the first entry's message, the offset after it) of a CRIU image: its magic (after the 4-byte image set magic),
    then length-prefixed protobuf messages. ValueError naming `kind` when the magic is not `magic` or the image ends
    inside that first entry (`entry`: what the first message is, for the message)."""
    if len(image) < 12 or struct.unpack_from("<I", image, 4)[0] != magic:
        raise ValueError(f"not {kind}")
    (size,) = struct.unpack_from("<I", image, 8)
    if 12 + size > len(image):
        raise ValueError(f"{kind} ends inside its {entry}")
    return image[12:12 + size], 12 + size


def core_task_state(image: bytes) -> Optional[int]:
    """task_core_entry.task_state of a core-N.img (CRIU writes it for each process; a thread's core has none:
    None). ValueError for anything that is not a core image."""
    tc = None
    for field, value in _protobuf_fields(_head_entry(image, _CORE_MAGIC, "a core image")[0]):
        if field == 3 and isinstance(value, bytes):  # core_entry.tc
            tc = value
    if tc is None:
        return None
    state = None
    for field, value in _protobuf_fields(tc):
        if field == 1 and isinstance(value, int):  # task_core_entry.task_state
            state = value
    return state


def stopped_tasks(images: Dict[str, bytes]) -> List[int]:
    """The pids (in the dumped tree's namespace) of the processes CRIU found stopped, from the core images of a dump
    {name: bytes}: a process the job itself stopped (SIGSTOP, SIGTSTP) is recorded stopped, and must stay so when
    the tree CRIU left stopped is let go. A core image that cannot be read names no process (it then runs again)."""
    out = []
    for name, data in images.items():
        m = CORE_IMAGE.match(os.path.basename(name))
        if not m:
            continue
        try:
            if core_task_state(data) == TASK_STOPPED:
                out.append(int(m.group(1)))
        except ValueError as e:
            log.debug("image %s: %s", name, e)
    return sorted(out)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class PagemapReader:
    """A pagemap image read as it arrives (a streamed dump feeds it while CRIU still dumps, so the entries are ready
    when CRIU ends): the pages id, the entries that cover pages, and where each PE_PARENT hole's flags byte is, so
    that without_parents() patches them in place. ValueError (from feed() on, kept for result()) for anything that
    is not a whole pagemap image."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._at = 0  # offset in the image of _pending[0]
        self.pages_id: Optional[int] = None
        self.entries: List[Tuple[int, int, bool]] = []  # (vaddr, nr_pages, in the parent), in order
        self._flag_bytes: Optional[List[int]] = []  # offsets of the holes' flags bytes; None: re-encode instead
        self._error: Optional[ValueError] = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._pending += data
        try:
            self._parse()
        except (ValueError, IndexError, struct.error) as e:
            self._error = ValueError(f"damaged pagemap image: {e}")

    def _parse(self) -> None:
        buf = self._pending
        pos = 0
        if self._at == 0:
            if len(buf) < 8:
                return
            if struct.unpack_from("<I", buf, 4)[0] != _PAGEMAP_MAGIC:
                raise ValueError("not a pagemap image")
            pos = 8
        n = len(buf)
        entries, flag_bytes = self.entries, self._flag_bytes
        head = _V4_WORDS
        while pos + 4 <= n:
            if pos + 20 <= n and self.pages_id is not None:
                # the usual entry, decoded from three words (_V4_WORDS): a final of a big job holds millions, and
                # _v4_entry's loop over the vaddr's bytes took half as long again
                size, x, y = head(buf, pos)
                nr = y >> 40 & 0xFF  # nr_pages' first byte; its second, if any, is y's next
                if x & _V4_X_MASK == _V4_X and y & _V4_Y_MASK == _V4_Y and (
                        size == 14 and nr < 0x80 or size == 15 and nr >= 0x80 and not y >> 55 & 1):
                    if nr >= 0x80:
                        nr = nr & 0x7F | (y >> 48 & 0x7F) << 7
                    if nr:
                        flags = y >> 24 & 0xFF
                        if flags & (_PE_PARENT | _PE_PRESENT):
                            hole = not flags & _PE_PRESENT
                            x >>= 8
                            entries.append((x & 0x7F | x >> 1 & 0x3F80 | x >> 2 & 0x1FC000 | x >> 3 & 0xFE00000
                                            | x >> 4 & 0x7F0000000 | x >> 5 & 0x3F800000000
                                            | x >> 6 & 0x1FC0000000000, nr, hole))
                            if hole and flag_bytes is not None:
                                if flags == _PE_PARENT:
                                    flag_bytes.append(self._at + pos + 15)
                                else:
                                    self._flag_bytes = flag_bytes = None
                    pos += 4 + size
                    continue
            size = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16 | buf[pos + 3] << 24
            if pos + 4 + size > n:
                break
            i, end = pos + 4, pos + 4 + size
            if self.pages_id is not None and buf[i] == 0x08:
                fast = _v4_entry(buf, i, end)  # tens of thousands an image: CRIU 4.x's layout decoded inline
                if fast is not None:
                    vaddr, nr, flags, at = fast
                    if nr and flags & (_PE_PARENT | _PE_PRESENT):
                        hole = not flags & _PE_PRESENT
                        entries.append((vaddr, nr, hole))
                        if hole and flag_bytes is not None:
                            if flags == _PE_PARENT:
                                flag_bytes.append(self._at + at)
                            else:
                                self._flag_bytes = flag_bytes = None
                    pos = end
                    continue
            f = _fields(buf[i:end])
            if self.pages_id is None:
                self.pages_id = f.get(1, 0)  # pagemap_head.pages_id: which pages-<id>.img holds the data
            else:
                # CRIU >= 4.0 keeps the page count in nr_pages (field 5); older images in compat_nr_pages (field 2)
                nr, flags = f.get(5, f.get(2, 0)), f.get(4)
                parent = bool(flags & _PE_PARENT) if flags is not None else bool(f.get(3, 0))
                present = bool(flags & _PE_PRESENT) if flags is not None else not parent
                if nr and (parent or present):
                    hole = parent and not present
                    entries.append((f.get(1, 0), nr, hole))
                    if hole:  # not CRIU 4.x's layout (_v4_entry): without_parents() re-encodes the image
                        self._flag_bytes = flag_bytes = None
            pos = end
        del buf[:pos]
        self._at += pos

    def result(self) -> Tuple[int, List[Tuple[int, int, bool]]]:
        """(pages_id, [(vaddr, nr_pages, in_parent)]) of a whole image."""
        if self._error is not None:
            raise self._error
        if self.pages_id is None or self._pending:
            raise ValueError("pagemap image ends inside an entry" if self._pending else "not a pagemap image")
        return self.pages_id, self.entries

    def without_parents(self, buf: bytes) -> bytes:
        """pagemap_without_parents(buf) of the image fed: its holes' flags bytes patched where CRIU 4.x laid them
        out, else re-encoded."""
        self.result()
        if self._flag_bytes is None:
            return _reencoded_without_parents(buf)
        out = bytearray(buf)
        for at in self._flag_bytes:
            out[at] = _PE_PRESENT
        return bytes(out)


def _v4_entry(buf, i: int, end: int) -> Optional[Tuple[int, int, int, int]]:
    """(vaddr, nr_pages, flags, offset of the flags byte) of a pagemap entry buf[i:end] laid out as CRIU 4.x writes
    it: vaddr (1), compat_nr_pages 0 (2), flags (4) in one byte, nr_pages (5); None for any other layout."""
    i += 1  # field 1 (vaddr), varint
    vaddr = shift = 0
    while True:
        b = buf[i]
        i += 1
        vaddr |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            return None
    if i + 5 > end or buf[i] != 0x10 or buf[i + 1] != 0 or buf[i + 2] != 0x20 or buf[i + 3] & 0x80 \
            or buf[i + 4] != 0x28:
        return None
    at, flags = i + 3, buf[i + 3]
    i += 5
    nr = shift = 0
    while i < end:
        b = buf[i]
        i += 1
        nr |= (b & 0x7F) << shift
        if b < 0x80:
            return (vaddr, nr, flags, at) if i == end else None
        shift += 7
    return None


def pagemap_entries(buf: bytes) -> Tuple[int, List[Tuple[int, int, bool]]]:
    """(pages_id, [(vaddr, nr_pages, in_parent)]) of a pagemap image's entries that cover pages, in order: present
    ones (their data is next in pages-<pages_id>.img) and PE_PARENT holes (the data is in the previous dump).
    ValueError when it is not a pagemap image."""
    reader = PagemapReader()
    reader.feed(buf)
    return reader.result()


def pagemap_pages_id(buf: bytes) -> int:
    """Which pages-<id>.img a pagemap image's data is in (its head only). ValueError when it is not a pagemap
    image."""
    return _fields(_head_entry(buf, _PAGEMAP_MAGIC, "a pagemap image", "head")[0]).get(1, 0)


def pagemap_without_parents(buf: bytes) -> bytes:
    """The pagemap image with each PE_PARENT hole turned into present pages (the caller put those pages into the
    pages image, in order): what a restore reads, with no parent images."""
    reader = PagemapReader()
    reader.feed(buf)
    return reader.without_parents(buf)


def _reencoded_without_parents(buf: bytes) -> bytes:
    out = bytearray(buf[:8])
    pos, first = 8, True
    while pos + 4 <= len(buf):
        (size,) = struct.unpack_from("<I", buf, pos)
        msg = buf[pos + 4 : pos + 4 + size]
        pos += 4 + size
        f = _fields(msg)
        if not first and (f.get(4, 0) & _PE_PARENT or f.get(3)):
            f[4] = (f.get(4, 0) & ~_PE_PARENT) | _PE_PRESENT
            f.pop(3, None)  # in_parent (images before flags existed)
            msg = b"".join(_varint(k << 3) + _varint(v) for k, v in sorted(f.items()))
        first = False
        out += struct.pack("<I", len(msg)) + msg
    if pos != len(buf):
        raise ValueError("pagemap image ends inside an entry")
    return bytes(out)


def pages_runs(images_dir: str, pages_name: str) -> Optional[List[Tuple[int, int]]]:
    """[(vaddr, nr_pages)] of the pages stored in pages-N.img, in file order; None when no pagemap describes it
    (any parse problem: callers then only lose deduplication or page-granular incrementals, never correctness)."""
    blobs = []
    try:
        for name in os.listdir(images_dir):
            if name.startswith("pagemap-") and name.endswith(".img"):
                with open(os.path.join(images_dir, name), "rb") as fh:
                    blobs.append(fh.read())
    except OSError:
        log.debug("no usable pagemap for %s", pages_name)
        return None
    return pages_runs_from(blobs, pages_name)


def pages_runs_from(pagemaps: Sequence[bytes], pages_name: str) -> Optional[List[Tuple[int, int]]]:
    """pages_runs() from the pagemap images' contents (a streamed dump has them in memory, not on disk)."""
    m = re.match(r"pages-(\d+)\.img$", pages_name)
    if not m:
        return None
    try:
        for blob in pagemaps:
            if pagemap_pages_id(blob) != int(m.group(1)):  # the head alone: a big pagemap is parsed once
                continue
            _pages_id, found = pagemap_entries(blob)
            return [(vaddr, nr_pages) for vaddr, nr_pages, in_parent in found if not in_parent]
    except (ValueError, IndexError, struct.error):
        log.debug("no usable pagemap for %s", pages_name)
    return None


def pages_cut_points(images_dir: str, pages_name: str, chunk_bytes: int) -> List[int]:
    """Offsets in pages-N.img where chunks should end, so chunks follow virtual addresses.

    Cutting at address multiples of the chunk size (not at file offsets) keeps a region's chunks identical between
    checkpoints when other regions grow or shrink, so unchanged memory is stored once. Any parse problem only costs
    deduplication, never correctness, so it falls back to plain fixed-size chunking.
    """
    entries = pages_runs(images_dir, pages_name)
    if entries is None:
        log.debug("no usable pagemap for %s; fixed-size chunks", pages_name)
        return []
    # one chunk per chunk-aligned window of the address space: its identity depends only on the pages in
    # that window, however CRIU happens to split the mappings into pagemap entries this time
    cuts: List[int] = []
    offset = 0
    last_window = None
    for vaddr, nr_pages in entries:
        end = vaddr + nr_pages * PAGE_SIZE
        window = vaddr // chunk_bytes
        if window != last_window:
            cuts.append(offset)
        addr = (window + 1) * chunk_bytes
        while addr < end:
            cuts.append(offset + (addr - vaddr))
            addr += chunk_bytes
        last_window = (end - 1) // chunk_bytes
        offset += nr_pages * PAGE_SIZE
    return cuts


_MM_MAGIC = 0x57492820  # criu/include/magic.h
# vma_entry.status bits (criu/include/image.h): a plain private anonymous mapping has VMA_AREA_REGULAR and
# VMA_ANON_PRIVATE (and may be the stack or the heap); any of _VMA_SPECIAL makes it something CRIU restores its own way
_VMA_AREA_REGULAR = 1 << 0
_VMA_ANON_PRIVATE = 1 << 9
_VMA_SPECIAL = (1 << 2 | 1 << 3 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14
                | 1 << 15 | 1 << 16 | 1 << 17 | 1 << 27 | 1 << 31)
_MAP_HUGETLB = 0x40000


def anon_private_vmas(image: bytes) -> List[Tuple[int, int]]:
    """(start, end) of the plain private anonymous mappings of an mm-N.img, in address order: where a page that the
    pagemap leaves out is restored as zeros. CRIU (criu/mem.c) maps such a mapping afresh (anonymous memory reads as
    zeros), or, when it is inherited from a parent process, drops with MADV_DONTNEED each page that the child's
    pagemap does not list. A file-backed private mapping would show the file instead, so it is never one of them;
    neither are huge page mappings, shadow stacks, AIO rings, SysV and other special ones. ValueError when `image` is
    not a whole mm image."""
    out = []
    for field, value in _protobuf_fields(_head_entry(image, _MM_MAGIC, "an mm image")[0]):
        if field != 14 or not isinstance(value, bytes):  # mm_entry.vmas
            continue
        vma = {k: v for k, v in _protobuf_fields(value) if isinstance(v, int)}
        status, flags = vma.get(7, 0), vma.get(6, 0)
        if status & _VMA_AREA_REGULAR and status & _VMA_ANON_PRIVATE and not status & _VMA_SPECIAL \
                and not flags & _MAP_HUGETLB and vma.get(1, 0) < vma.get(2, 0):
            out.append((vma[1], vma[2]))
    return sorted(out)


def pagemap_present_entries(buf: bytes) -> Tuple[bytes, List[Tuple[int, int, int]]]:
    """(the image's magic and head, [(vaddr, nr_pages, flags)]) of a pagemap image whose entries all hold pages of its
    pages image (PE_PRESENT, as a restore's images have them: no PE_PARENT holes). ValueError otherwise."""
    pos = _head_entry(buf, _PAGEMAP_MAGIC, "a pagemap image", "head")[1]
    head, entries = bytes(buf[:pos]), []
    while pos + 4 <= len(buf):
        (size,) = struct.unpack_from("<I", buf, pos)
        end = pos + 4 + size
        if end > len(buf):
            break
        f = _fields(buf[pos + 4:end])
        pos = end
        flags = f.get(4)
        if flags is None or f.get(3) or flags & _PE_PARENT or not flags & _PE_PRESENT or set(f) - {1, 2, 4, 5}:
            raise ValueError(f"pagemap entry {f} is not a plain present one")
        nr = f.get(5, f.get(2, 0))
        if nr:
            entries.append((f.get(1, 0), nr, flags))
    if pos != len(buf):
        raise ValueError("pagemap image ends inside an entry")
    return head, entries


def encode_pagemap(head: bytes, entries: Sequence[Tuple[int, int, int]]) -> bytes:
    """A pagemap image of `head` (pagemap_present_entries') and entries (vaddr, nr_pages, flags), laid out as CRIU
    4.x writes them (vaddr, compat_nr_pages 0, flags, nr_pages)."""
    out = bytearray(head)
    for vaddr, nr, flags in entries:
        msg = b"\x08" + _varint(vaddr) + b"\x10\x00\x20" + _varint(flags) + b"\x28" + _varint(nr)
        out += struct.pack("<I", len(msg)) + msg
    return bytes(out)
