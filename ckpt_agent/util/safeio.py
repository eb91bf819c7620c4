"""Reading files that somebody else may have put in place (and writing files whole, `write_atomic`): the store
(a job's user owns its directory) and configuration files. Only a regular file is read, never waited on (a FIFO)
and never beyond a bound (a device such as /dev/zero, or a file larger than its kind can be)."""

from __future__ import annotations

import errno
import os
import stat
from typing import List, Optional, Tuple


class NotRegularFile(OSError):
    """A store file that is a link, FIFO, device or directory, or larger than its bound."""


def read_regular(path: str, max_bytes: int, dir_fd: Optional[int] = None, follow: bool = False) -> bytes:
    """The content of a regular file of at most `max_bytes`: opened without following a link (unless `follow`)
    and without blocking (a FIFO in its place is refused, never waited on), checked with fstat before reading.
    FileNotFoundError when missing; NotRegularFile for anything else in its place or a file beyond the bound."""
    return read_regular_stat(path, max_bytes, dir_fd, follow)[0]


def _open_regular(path: str, max_bytes: int, flags: int, dir_fd: Optional[int] = None) -> Tuple[int, os.stat_result]:
    """An open descriptor of the regular file at `path`, of at most `max_bytes`, and its fstat; NotRegularFile for a
    link (without O_NOFOLLOW's consent), FIFO, device or directory, or a larger file."""
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise NotRegularFile(e.errno, f"{path} is a symbolic link or a special file, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise NotRegularFile(errno.EFBIG, f"{path} is {st.st_size} bytes, more than the {max_bytes} expected")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular_stat(path: str, max_bytes: int, dir_fd: Optional[int] = None,
                      follow: bool = False) -> Tuple[bytes, os.stat_result]:
    """read_regular(), and the file's fstat taken before reading: a write after that stat changes its ctime, so
    a caller that checks the content may trust the file for as long as it stats the same (chunks.py)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd, st = _open_regular(path, max_bytes, flags, dir_fd)
    try:
        chunks = []
        left = max_bytes + 1
        while left > 0:
            data = os.read(fd, min(left, 1 << 20))
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise NotRegularFile(errno.EFBIG, f"{path} grew beyond the {max_bytes} bytes expected")
        return data, st
    finally:
        os.close(fd)


DIRECT_ALIGN = 4096  # O_DIRECT: buffer, offset and length in multiples of this (every logical block size up to 4 KiB)


class DirectIOUnsupported(Exception):
    """The file system refuses O_DIRECT (tmpfs, some FUSE and overlay file systems): read through the page cache."""


def direct_buffer_bytes(max_bytes: int) -> int:
    """The size a read_regular_direct() buffer needs for files of up to `max_bytes` (and one block more, which shows
    a file beyond the bound)."""
    return (max_bytes // DIRECT_ALIGN + 1) * DIRECT_ALIGN


def read_regular_direct(path: str, max_bytes: int, buf) -> Tuple[int, os.stat_result]:
    """read_regular_stat() into `buf` (page-aligned and writable, e.g. an anonymous mmap, of at least
    direct_buffer_bytes(max_bytes)) around the page cache (O_DIRECT): (bytes read, the fstat taken before reading).

    A file read once, as a restore reads every chunk, costs no page-cache pages: on a 2-vCPU VM, reading 1 GiB of
    1 MiB chunk files cold took 0.74-0.76 CPU-s buffered and 0.1 direct, most of it allocating, charging and then
    freeing the cache's pages. The bytes land in the caller's own buffer, so nobody can change them between the
    caller's check and its use (through the page cache, a writer of the file could). Dirty cached pages of the file
    are written back first by the kernel, so a file written a moment ago reads as written. DirectIOUnsupported
    where the file system refuses O_DIRECT."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECT
    try:
        fd, st = _open_regular(path, max_bytes, flags)
    except NotRegularFile:
        raise
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise DirectIOUnsupported(path) from None
        raise
    try:
        cap = direct_buffer_bytes(max_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < cap:
                n = os.preadv(fd, [view[got:cap]], got)
                got += n
                if n == 0 or got % DIRECT_ALIGN:  # the end of the file (a short read ends on it)
                    break
        except OSError as e:
            if e.errno == errno.EINVAL and got == 0:  # alignment the file system wants beyond ours
                raise DirectIOUnsupported(path) from None
            raise
        finally:
            view.release()
        if got > max_bytes:
            raise NotRegularFile(errno.EFBIG, f"{path} grew beyond the {max_bytes} bytes expected")
        return got, st
    finally:
        os.close(fd)


def open_dir_nofollow(name: str, dir_fd: Optional[int] = None) -> Optional[int]:
    """A directory opened without following a symbolic link in its last component; None when `name` is missing,
    not a directory or a link."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None


def scandir_names(dir_fd: int) -> List[str]:
    """The names in the directory open at `dir_fd`, sorted."""
    with os.scandir(dir_fd) as it:
        return sorted(e.name for e in it)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, durable: bool = True, dir_fd: Optional[int] = None) -> None:
    """`data` appears at `path` (relative to `dir_fd` when given) complete or not at all: written to a temporary
    name beside it (never through a link planted there), given `mode` exactly, then renamed over it. `durable`: the
    file and the rename are on disk when this returns."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if dir_fd is None:
            os.rename(tmp, path)
        else:
            os.rename(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    if durable:
        if dir_fd is not None:
            os.fsync(dir_fd)
        else:
            fsync_dir(os.path.dirname(path) or ".")
