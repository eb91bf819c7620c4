"""Capture and put back the files a checkpointed tool depends on: its working directory, extra configured paths,
and every regular file it has open for writing, all while the tool is stopped so files and memory agree.

CRIU records only the path, size and position of open files; on restore it refuses a file whose size changed
("has bad size") or, worse, resumes against a file that already holds the future. Capturing the files with the
images and putting them back before the restore removes both problems, and brings back a node-local scratch
directory that no longer exists on the new machine.

Unchanged files are not read again: a file whose inode, size, mtime and ctime match the previous checkpoint reuses
its chunk list, so a large working directory costs little after the first checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ckpt_agent.store.chunks import (
    ChunkStore,
    WriteStats,
    restore_file,
    store_file,
)
from ckpt_agent.store.manifest import FileEntry
from ckpt_agent.util.usercreds import Creds, fs_identity

log = logging.getLogger(__name__)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


def ns_pids(init_pid: int) -> List[int]:
    """Host pids of every process in the PID namespace whose init is `init_pid`."""
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return []
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") == ns:
                pids.append(int(name))
        except OSError:
            continue
    return sorted(pids)


def by_ns_pid(pids: Iterable[int]) -> Dict[int, int]:
    """{pid in its own (innermost) PID namespace: host pid} of these host pids, from /proc/<pid>/status NSpid (what
    CRIU names a dumped tree's images by); a process that is gone is left out."""
    out: Dict[int, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("NSpid:"):
                        out[int(line.split()[-1])] = pid
                        break
        except (OSError, ValueError, IndexError):
            continue
    return out


def tree_rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def open_writable_files(pids: Iterable[int]) -> Set[str]:
    """Paths of regular files any of the processes has open for writing or mapped shared-writable."""
    found: Set[str] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                if not target.startswith("/") or target.endswith(" (deleted)"):
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    flags = next((int(line.split()[1], 8) for line in fh if line.startswith("flags:")), 0)
                if flags & _WRITE_FLAGS and stat.S_ISREG(os.stat(target).st_mode):
                    found.add(target)
            except (OSError, ValueError):
                continue
        try:
            with open(f"/proc/{pid}/maps") as fh:
                for line in fh:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[1][1] == "w" and parts[1][3] == "s" and parts[5].startswith("/"):
                        path = parts[5].strip()
                        if not path.endswith(" (deleted)") and os.path.isfile(path):
                            found.add(path)
        except OSError:
            continue
    return found


def _excluded(path: str, exclude: Set[str]) -> bool:
    return any(path == e or path.startswith(e.rstrip("/") + "/") for e in exclude)


def _walk(root: str, exclude: Set[str]) -> Iterable[Tuple[str, os.stat_result]]:
    """Every entry below root (root included), without following symbolic links."""
    try:
        st = os.lstat(root)
    except OSError:
        return
    yield root, st
    if not stat.S_ISDIR(st.st_mode):
        return
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            log.warning("cannot read directory %s: %s", d, e.strerror)
            continue
        for e in entries:
            if _excluded(e.path, exclude):
                continue
            try:
                est = e.stat(follow_symlinks=False)
            except OSError:
                continue
            yield e.path, est
            if stat.S_ISDIR(est.st_mode):
                stack.append(e.path)


def capture(
    chunks: ChunkStore,
    pool: concurrent.futures.Executor,
    roots: Iterable[str],
    open_files: Iterable[str],
    exclude: Set[str],
    previous: Optional[Dict[str, FileEntry]] = None,
    owner_uid: Optional[int] = None,
) -> Tuple[List[FileEntry], WriteStats]:
    """owner_uid: the agent capturing for an ordinary user takes only what that user owns, so root never copies
    into a checkpoint (and so back into the user's hands) a file the user could not read."""
    previous = previous or {}
    stats = WriteStats()
    seen: Dict[str, FileEntry] = {}
    items: List[Tuple[str, os.stat_result]] = []
    for root in roots:
        items.extend(_walk(os.path.abspath(root), exclude))
    for path in sorted(set(open_files)):
        if path in seen or _excluded(path, exclude):
            continue
        # parents first, so a restore can recreate a vanished scratch directory with its modes
        parent = os.path.dirname(path)
        chain = []
        while parent and parent != "/":
            chain.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(chain):
            try:
                items.append((p, os.lstat(p)))
            except OSError:
                pass
        try:
            items.append((path, os.lstat(path)))
        except OSError:
            continue
    for path, st in items:
        if path in seen:
            continue
        if owner_uid is not None and st.st_uid != owner_uid and not stat.S_ISDIR(st.st_mode):
            log.info("not capturing %s: owned by uid %d, not the job's user", path, st.st_uid)
            continue
        mode = stat.S_IMODE(st.st_mode)
        base = dict(path=path, mode=mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
        if stat.S_ISDIR(st.st_mode):
            seen[path] = FileEntry(kind="dir", **base)
        elif stat.S_ISLNK(st.st_mode):
            try:
                seen[path] = FileEntry(kind="symlink", target=os.readlink(path), **base)
            except OSError:
                continue
        elif stat.S_ISREG(st.st_mode):
            prev = previous.get(path)
            if (
                prev is not None and prev.kind == "file" and prev.chunks is not None and prev.ino == st.st_ino
                and prev.size == st.st_size and prev.mtime_ns == st.st_mtime_ns and prev.ctime_ns == st.st_ctime_ns
                and all(c.digest in chunks.known for c in prev.chunks)
            ):
                refs = prev.chunks
                stats.bytes_in += prev.size
                stats.chunks_reused += len(refs)
            else:
                try:
                    refs, fstats, _ = store_file(chunks, path, pool)
                except OSError as e:
                    log.warning("cannot capture %s: %s", path, e.strerror)
                    continue
                stats.add(fstats)
            seen[path] = FileEntry(
                kind="file", size=st.st_size, ino=st.st_ino, ctime_ns=st.st_ctime_ns, chunks=refs, **base
            )
        # sockets, fifos and devices are recreated by CRIU or belong to the system: not captured
    return list(seen.values()), stats


def restore_files(
    chunks: ChunkStore,
    pool: concurrent.futures.Executor,
    entries: Iterable[FileEntry],
    creds: Optional[Creds] = None,
    roots: Optional[Sequence[str]] = None,
    trusted: bool = True,
) -> Tuple[int, int]:
    """Put captured files back where they differ from the checkpoint; return (files written, files unchanged).

    A file whose size and mtime equal the recorded ones is taken as unchanged (what rsync does); every other file
    is rewritten from verified chunks, so the tool resumes against exactly the state it was checkpointed with.

    Confinement (a manifest is data, not orders): entries are put back only under `roots` (the job's working
    directory and configured extra paths; default "/"). A `trusted` (signed) checkpoint may also put back the
    files the tool had open outside them, creating missing parent directories but never changing existing ones.
    Anything else outside is a damaged checkpoint, refused before anything is written. Every path is walked from
    "/" one directory at a time without following symbolic links: a link (or other non-directory) where a
    directory is needed is replaced only inside the roots and only where the checkpoint recorded a directory;
    elsewhere the restore is refused.
    """
    plan = _plan(list(entries), ["/"] if roots is None else roots, trusted)
    if creds is None or creds.uid == 0:
        return _restore_files(chunks, pool, plan, set_owner=True)
    with fs_identity(creds):  # chunks are read by pool threads as root; every path is touched as the user
        return _restore_files(chunks, pool, plan, set_owner=False)


_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _inside(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


@dataclass
class _Plan:
    roots: List[str]
    entries: List[FileEntry]  # what is put back
    dirs: Dict[str, FileEntry]  # recorded directories (inside the roots, and parents of outside open files)

    def in_roots(self, path: str) -> bool:
        return any(_inside(path, r) for r in self.roots)


def _plan(entries: List[FileEntry], roots: Sequence[str], trusted: bool) -> _Plan:
    from ckpt_agent.errors import DamagedCheckpointError

    norm = [os.path.normpath(os.path.abspath(r)) for r in roots]
    plan = _Plan(norm, [], {})
    outside_dirs: Dict[str, FileEntry] = {}
    outside_files: List[str] = []
    for e in entries:
        if not e.path.startswith("/") or os.path.normpath(e.path) != e.path:
            raise DamagedCheckpointError(f"checkpoint names a path that is not absolute and normal: {e.path[:200]!r}")
        if plan.in_roots(e.path):
            plan.entries.append(e)
            if e.kind == "dir":
                plan.dirs[e.path] = e
        elif trusted and e.kind == "file":
            plan.entries.append(e)
            outside_files.append(e.path)
        elif e.kind == "dir":  # a parent of what is put back: used only to create it if missing
            outside_dirs[e.path] = e
        else:
            raise DamagedCheckpointError(
                f"checkpoint names {e.path[:200]} ({e.kind}), outside the job's directories ({', '.join(norm)})")
    parents = {os.path.dirname(p) for p in outside_files + norm}
    for p in list(parents):
        while p not in ("/", ""):
            p = os.path.dirname(p)
            parents.add(p)
    for path, e in outside_dirs.items():
        if path not in parents:
            raise DamagedCheckpointError(f"checkpoint names directory {path[:200]}, outside the job's directories "
                                         f"({', '.join(norm)}) and above no file it puts back")
        plan.dirs[path] = e
    return plan


class _Walker:
    """Opens the parent directory of a path from "/" one component at a time (O_NOFOLLOW), creating missing
    directories; keeps the last parent open (entries of one directory come together)."""

    def __init__(self, plan: _Plan, set_owner: bool):
        self.plan = plan
        self.set_owner = set_owner
        self._cached: Tuple[Optional[str], int] = (None, -1)

    def parent(self, path: str) -> int:
        parent = os.path.dirname(path)
        if self._cached[0] == parent:
            return self._cached[1]
        fd = os.open("/", _DIR_OPEN)
        cur = ""
        try:
            for comp in [c for c in parent.split("/") if c]:
                cur += "/" + comp
                nfd = self.step(fd, comp, cur)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self._cached = (parent, fd)
        return fd

    def step(self, fd: int, name: str, path: str) -> int:
        """The directory `name` in `fd` (whose path is `path`), opened; created or put back where needed."""
        from ckpt_agent.errors import PermissionDenied

        try:
            return os.open(name, _DIR_OPEN, dir_fd=fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if path not in self.plan.dirs or not self.plan.in_roots(path):
                raise PermissionDenied(f"refusing to restore below {path}: it is not a directory (a symbolic "
                                       "link?) and the checkpoint does not own it") from None
            os.unlink(name, dir_fd=fd)  # a link or file planted where the checkpoint has a directory
        entry = self.plan.dirs.get(path)
        os.mkdir(name, entry.mode if entry else 0o755, dir_fd=fd)
        nfd = os.open(name, _DIR_OPEN, dir_fd=fd)
        if entry is not None:
            os.fchmod(nfd, entry.mode)
            if self.set_owner:
                os.fchown(nfd, entry.uid, entry.gid)
        return nfd

    def close(self) -> None:
        if self._cached[1] >= 0:
            os.close(self._cached[1])
        self._cached = (None, -1)


def _restore_files(chunks, pool, plan: _Plan, set_owner: bool) -> Tuple[int, int]:
    from ckpt_agent.errors import StoreError

    written = unchanged = 0
    walk = _Walker(plan, set_owner)
    entries = plan.entries
    try:
        for e in sorted((e for e in entries if e.kind == "dir" and e.path != "/"), key=lambda e: e.path.count("/")):
            os.close(walk.step(walk.parent(e.path), os.path.basename(e.path), e.path))
        for e in entries:
            if e.kind == "dir" or e.path == "/":
                continue
            pfd, name = walk.parent(e.path), os.path.basename(e.path)
            if e.kind == "file":
                try:
                    st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
                        unchanged += 1
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        raise StoreError(f"cannot restore file {e.path}: a directory now stands in its place")
                except FileNotFoundError:
                    pass
                restore_file(chunks, e.chunks or [], name, pool, mode=e.mode, where=e.path, dir_fd=pfd)
                if set_owner:
                    os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
                os.utime(name, ns=(e.mtime_ns, e.mtime_ns), dir_fd=pfd, follow_symlinks=False)
                written += 1
            elif e.kind == "symlink":
                try:
                    if os.readlink(name, dir_fd=pfd) == e.target:
                        continue
                    os.unlink(name, dir_fd=pfd)
                except FileNotFoundError:
                    pass
                except OSError:  # not a link: a directory stays, anything else is replaced
                    if stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                        continue
                    os.unlink(name, dir_fd=pfd)
                os.symlink(e.target, name, dir_fd=pfd)
                if set_owner:
                    os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        for e in entries:
            if e.kind == "dir" and e.path != "/":
                try:
                    os.utime(os.path.basename(e.path), ns=(e.mtime_ns, e.mtime_ns), dir_fd=walk.parent(e.path),
                             follow_symlinks=False)
                except OSError:
                    pass
    finally:
        walk.close()
    return written, unchanged
