"""Acting for an ordinary user's job from the root agent: whose process is this, which cgroups does it live in,
and file operations done with the user's file-system identity (so a planted symbolic link gives the user nothing
the user could not already do)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import pwd
from dataclasses import dataclass
from typing import ContextManager, Iterator, List, Optional, Tuple

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
# glibc's setgroups() changes every thread; the raw system call changes only the calling one, like setfsuid()
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}.get(platform.machine())


@dataclass(frozen=True)
class Creds:
    uid: int
    gid: int
    groups: Tuple[int, ...]


def creds_of(pid: int) -> Creds:
    """Real uid, gid and supplementary groups of a process, from /proc (what the kernel says, not what it claims)."""
    uid = gid = None
    groups: List[int] = []
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
            elif line.startswith("Groups:"):
                groups = [int(g) for g in line.split()[1:]]
    if uid is None or gid is None:
        raise OSError(f"cannot read the credentials of process {pid}")
    return Creds(uid, gid, tuple(groups))


def cgroup_procs_files(pid: int) -> List[str]:
    """The cgroup.procs files of every hierarchy `pid` is in (cgroup v2 and any v1 hierarchies)."""
    mounts = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if not rfields or rfields[0] not in ("cgroup", "cgroup2"):
                continue
            mount_point, root = fields[4], fields[3]
            if rfields[0] == "cgroup2":
                mounts[""] = (mount_point, root)
            else:
                for opt in rfields[2].split(","):
                    mounts.setdefault(opt, (mount_point, root))
                name = next((o[5:] for o in rfields[2].split(",") if o.startswith("name=")), None)
                if name:
                    mounts["name=" + name] = (mount_point, root)
    out = []
    with open(f"/proc/{pid}/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            key = controllers.split(",")[0] if controllers else ""
            if key not in mounts:
                continue
            mount_point, root = mounts[key]
            rel = path[len(root):] if root != "/" and path.startswith(root) else path
            out.append(os.path.join(mount_point, rel.lstrip("/"), "cgroup.procs"))
    return out


def join_cgroups_of(pid: int) -> None:
    """Move the calling process into the cgroups of `pid` (the job's wrapper), so what it starts or restores is
    limited, accounted and killed with the job. Best effort per hierarchy: a hierarchy we cannot enter is skipped."""
    for procs in cgroup_procs_files(pid):
        try:
            with open(procs, "w") as fh:
                fh.write(str(os.getpid()))
        except OSError:
            pass


def drop_to(creds: Creds) -> None:
    """Become the user for good (in a child about to exec): groups, then gid, then uid."""
    os.setgroups(list(creds.groups))
    os.setgid(creds.gid)
    os.setuid(creds.uid)


def acting_as(creds: Optional[Creds]) -> ContextManager[None]:
    """fs_identity(creds) when acting for a user, else nothing: what the root agent wraps around every file
    operation inside a user's job directory, which the user can write and so fill with links."""
    return fs_identity(creds) if creds is not None else contextlib.nullcontext()


@contextlib.contextmanager
def fs_identity(creds: Creds) -> Iterator[None]:
    """File-system identity of the user for the calling thread only (setfsuid/setfsgid and the thread's groups)."""
    if creds.uid == 0:
        yield
        return
    saved_groups = os.getgroups()
    _set_thread_groups(creds.groups)
    _libc.setfsgid(creds.gid)
    _libc.setfsuid(creds.uid)
    try:
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)
        _set_thread_groups(tuple(saved_groups))


def _set_thread_groups(groups: Tuple[int, ...]) -> None:
    if _SYS_SETGROUPS is None:
        return
    arr = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(_SYS_SETGROUPS, len(groups), arr) != 0:
        log.warning("setgroups for the restore thread failed: %s", os.strerror(ctypes.get_errno()))


CAP_SYS_RESOURCE = 24


def root_has_cap_sys_resource() -> bool:
    """CRIU reads every task's resource limits with prlimit(); for another user's task that needs CAP_SYS_RESOURCE.
    Root has it on EC2 instances; some containers and microVMs (this project's CI machine among them) withhold it,
    where only a CRIU with our patch 0001 can dump ordinary users' jobs (`Criu.can_dump_other_users`)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def owner_of_path(path: str) -> str:
    """'user NAME (uid N)' for the owner of a file, for refusals that must name whose it is."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "another user"
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
