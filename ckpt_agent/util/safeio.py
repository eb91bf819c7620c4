"""Reading files that somebody else may have put in place: the store (a job's user owns its directory) and
configuration files. Only a regular file is read, never waited on (a FIFO) and never beyond a bound (a device such
as /dev/zero, or a file larger than its kind can be)."""

from __future__ import annotations

import errno
import os
import stat
from typing import Optional


class NotRegularFile(OSError):
    """A store file that is a link, FIFO, device or directory, or larger than its bound."""


def read_regular(path: str, max_bytes: int, dir_fd: Optional[int] = None, follow: bool = False) -> bytes:
    """The content of a regular file of at most `max_bytes`: opened without following a link (unless `follow`)
    and without blocking (a FIFO in its place is refused, never waited on), checked with fstat before reading.
    FileNotFoundError when missing; NotRegularFile for anything else in its place or a file beyond the bound."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
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
        return data
    finally:
        os.close(fd)
