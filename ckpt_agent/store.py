"""The checkpoint store: a directory tree on a shared file system (FSx for Lustre on a cluster).

Layout (job directories are mode 0700):

    <store>/<job-id>/                 one job (array tasks: <array-job>_<task>)
        lock                          writers hold it shared, `ckpt gc` exclusive (flock)
        events.jsonl                  lifecycle events (run segments, checkpoints, restores, notices, requeues)
        chunks/<xx>/<sha256>[.zst]    content-addressed data shared by all steps and generations of the job
        <step>/
            gen-000003/manifest.json  a committed checkpoint; a generation directory appears only when complete
            gen-000004.partial-<pid>/ a checkpoint being written (never read by restore)
            result.json               the step finished: its exit status; a rerun returns it without running

A checkpoint becomes visible only when complete and durable: chunks are written and the file system synced, then
the manifest is written and fsynced inside the partial directory, which is then renamed to its final name.
A crash at any moment leaves the previous generation intact. Manifests carry the checksums of every chunk and,
where a key is configured, an HMAC-SHA256 over the manifest made with a key that users cannot read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import stat
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from .chunkstore import ChunkRef, ChunkStore
from .errors import CkptError, DamagedCheckpointError, NotFoundError, PermissionDenied, StoreError
from .usercreds import owner_of_path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RESULT = "result.json"
EVENTS = "events.jsonl"
FORMAT_VERSION = 1
_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_PARTIAL_RE = re.compile(r"^gen-(\d{6,})\.partial-(\d+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z")  # \Z: "$" would accept a trailing newline


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> dt.datetime:
    return dt.datetime.strptime(s.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


def check_name(kind: str, value: str) -> str:
    """Job ids and step names become directory names: refuse anything that could escape the store."""
    if not _SAFE_NAME.match(value or "") or value in (".", ".."):
        raise StoreError(f"invalid {kind} {value!r}: use letters, digits, '_', '-', '.', '+'")
    return value


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


@dataclass
class Generation:
    job_id: str
    step: str
    number: int
    path: str

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)


class Signer:
    """HMAC-SHA256 over manifest bytes with a key only root can read (the node agent's key file)."""

    def __init__(self, key: Optional[bytes]):
        self.key = key

    @classmethod
    def from_file(cls, path: str) -> Signer:
        try:
            with open(path, "rb") as fh:
                key = fh.read().strip()
        except FileNotFoundError:
            return cls(None)
        except PermissionError:
            return cls(None)
        return cls(key or None)

    def sign(self, payload: bytes) -> Optional[str]:
        if not self.key:
            return None
        return hmac.new(self.key, payload, hashlib.sha256).hexdigest()

    def verify(self, payload: bytes, signature: Optional[str], where: str, required: bool) -> None:
        if not self.key:
            if required:
                raise PermissionDenied(f"{where}: no signing key available to verify the checkpoint")
            return
        if not signature:
            if required:
                raise PermissionDenied(f"{where}: checkpoint is not signed by the agent; refusing to restore it")
            return
        if not hmac.compare_digest(self.sign(payload) or "", signature):
            raise PermissionDenied(f"{where}: checkpoint signature does not match: it was altered or forged")


class CheckpointStore:
    def __init__(self, root: str, signer: Optional[Signer] = None):
        self.root = os.path.abspath(root)
        self.signer = signer or Signer(None)

    # --- layout -----------------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        return os.path.join(self.root, check_name("job id", job_id))

    def step_dir(self, job_id: str, step: str) -> str:
        return os.path.join(self.job_dir(job_id), check_name("step name", step))

    def chunk_dir(self, job_id: str) -> str:
        return os.path.join(self.job_dir(job_id), "chunks")

    def ensure_job(self, job_id: str, step: str, uid: Optional[int] = None, gid: Optional[int] = None) -> str:
        """Create the job's directories (mode 0700, owned by the job's user). A job directory that is a symbolic
        link, or that belongs to somebody else than the job's user or root, is refused: the store may be writable
        by every user, and nobody may plant a directory for another user's job."""
        if not os.path.isdir(self.root):
            raise StoreError(f"checkpoint store {self.root} does not exist or is not a directory")
        jd = self.job_dir(job_id)
        try:
            if not os.path.lexists(jd):
                try:
                    os.mkdir(jd, 0o700)
                except FileExistsError:
                    pass
            st = os.lstat(jd)
            if os.path.islink(jd) or not os.path.isdir(jd):
                raise StoreError(f"{jd} is not a directory (a symbolic link?); refusing to use it")
            if uid is not None and st.st_uid not in (0, uid):
                raise StoreError(f"{jd} belongs to uid {st.st_uid}, not to the job's user (uid {uid}); refusing it")
            created = [jd]
            for sub in (self.step_dir(job_id, step), self.chunk_dir(job_id)):
                if not os.path.lexists(sub):
                    os.makedirs(sub, mode=0o700, exist_ok=True)
                    created.append(sub)
                elif os.path.islink(sub):
                    raise StoreError(f"{sub} is a symbolic link; refusing to use it")
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(jd, 0o700)
            if uid is not None and os.geteuid() == 0 and uid != 0:
                for p in created:
                    os.chown(p, uid, gid if gid is not None else -1)
        except OSError as e:
            raise StoreError(f"cannot create {jd}: {e.strerror}") from e
        return jd

    @contextlib.contextmanager
    def job_lock(
        self, job_id: str, exclusive: bool = False, blocking: bool = True, dir_fd: Optional[int] = None
    ) -> Iterator[bool]:
        """flock on <job>/lock. `dir_fd`: the job directory, already opened without following links (`ckpt gc`),
        so that a job directory swapped for a link never makes us create a lock file elsewhere."""
        path = "lock" if dir_fd is not None else os.path.join(self.job_dir(job_id), "lock")
        # read-only is enough for flock, and lets the job's user share a lock file the root agent created
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=dir_fd)
        try:
            flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            if not blocking:
                flags |= fcntl.LOCK_NB
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # --- generations ------------------------------------------------------------------------------------------
    def generations(self, job_id: str, step: str) -> List[Generation]:
        """Committed generations, oldest first."""
        sd = self.step_dir(job_id, step)
        try:
            names = os.listdir(sd)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._read_error(job_id, sd, e) from e
        gens = []
        for name in names:
            m = _GEN_RE.match(name)
            path = os.path.join(sd, name)
            if m and not os.path.islink(path) and os.path.isfile(os.path.join(path, MANIFEST)):
                gens.append(Generation(job_id, step, int(m.group(1)), path))
        return sorted(gens, key=lambda g: g.number)

    def _read_error(self, job_id: str, path: str, e: OSError) -> CkptError:
        """A job's directory is its user's alone (0700): another user's refusal names the owner (77); any other
        failure to read the store is a store error (74) naming the path."""
        if isinstance(e, PermissionError) and os.geteuid() != 0:
            return PermissionDenied(f"job {job_id} belongs to {owner_of_path(self.job_dir(job_id))}: only its owner "
                                    f"or root may read its checkpoints ({path})")
        return StoreError(f"cannot list {path}: {e.strerror}")

    def partials(self, job_id: str, step: str) -> List[str]:
        sd = self.step_dir(job_id, step)
        try:
            return [os.path.join(sd, n) for n in os.listdir(sd) if _PARTIAL_RE.match(n)]
        except FileNotFoundError:
            return []

    def jobs(self) -> List[str]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as e:
            raise StoreError(f"cannot list checkpoint store {self.root}: {e.strerror}") from e
        return [e.name for e in entries if e.is_dir(follow_symlinks=False) and _SAFE_NAME.match(e.name)]

    def steps(self, job_id: str) -> List[str]:
        jd = self.job_dir(job_id)
        try:
            entries = sorted(os.scandir(jd), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._read_error(job_id, jd, e) from e
        return [e.name for e in entries if e.is_dir(follow_symlinks=False) and e.name != "chunks"]

    def begin(self, job_id: str, step: str) -> Tuple[int, str]:
        """Reserve the next generation number; return it and its partial directory."""
        gens = self.generations(job_id, step)
        number = (gens[-1].number if gens else 0) + 1
        for p in self.partials(job_id, step):
            m = _PARTIAL_RE.match(os.path.basename(p))
            if m:
                number = max(number, int(m.group(1)) + 1)
        partial = os.path.join(self.step_dir(job_id, step), f"gen-{number:06d}.partial-{os.getpid()}")
        try:
            os.mkdir(partial, 0o700)
        except OSError as e:
            raise StoreError(f"cannot create {partial}: {e.strerror}") from e
        return number, partial

    def commit(
        self, partial: str, number: int, manifest: Dict[str, Any], owner: Optional[Tuple[int, int]] = None
    ) -> Generation:
        """Write the manifest last, durably, then make the generation visible by renaming it."""
        from .chunkstore import syncfs

        step_dir = os.path.dirname(partial)
        job_dir = os.path.dirname(step_dir)
        syncfs(job_dir)  # chunks written without per-file fsync become durable here, before the manifest exists
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        signature = self.signer.sign(body)
        envelope = {"manifest": manifest, "signature": signature} if signature else {"manifest": manifest}
        data = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
        write_atomic(os.path.join(partial, MANIFEST), data)
        if owner:  # readable by the job's user (`ckpt list`, `ckpt verify`); the signature guards against edits
            os.chown(os.path.join(partial, MANIFEST), *owner)
            os.chown(partial, *owner)
        final = os.path.join(step_dir, f"gen-{number:06d}")
        os.rename(partial, final)
        fsync_dir(step_dir)
        return Generation(os.path.basename(job_dir), os.path.basename(step_dir), number, final)

    def abort(self, partial: str) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def load_manifest(self, gen: Generation, require_signature: bool = False) -> Dict[str, Any]:
        where = gen.manifest_path
        try:
            with open(where, "rb") as fh:
                envelope = json.loads(fh.read())
            manifest = envelope["manifest"]
        except FileNotFoundError:
            raise DamagedCheckpointError(f"{where}: manifest is missing") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedCheckpointError(f"{where}: manifest is unreadable ({e})") from e
        except OSError as e:
            raise StoreError(f"{where}: cannot read manifest: {e.strerror}") from e
        body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        self.signer.verify(body, envelope.get("signature"), where, require_signature)
        if manifest.get("format") != FORMAT_VERSION:
            raise DamagedCheckpointError(f"{where}: unsupported manifest format {manifest.get('format')!r}")
        return manifest

    def chunks_for(
        self,
        job_id: str,
        compression: str = "zstd",
        known: Optional[Dict[str, str]] = None,
        owner: Optional[Tuple[int, int]] = None,
    ) -> ChunkStore:
        return ChunkStore(self.chunk_dir(job_id), compression, known, owner)

    def known_chunks(self, job_id: str) -> Dict[str, str]:
        """digest -> codec of every chunk referenced by a committed manifest of the job (what need not be rewritten)."""
        known: Dict[str, str] = {}
        for step in self.steps(job_id):
            for gen in self.generations(job_id, step):
                try:
                    manifest = self.load_manifest(gen)
                except (DamagedCheckpointError, PermissionDenied):
                    continue
                for ref in manifest_refs(manifest):
                    known[ref.digest] = ref.codec
        return {d: c for d, c in known.items() if os.path.exists(self._chunk_path(job_id, d, c))}

    def _chunk_path(self, job_id: str, digest: str, codec: str) -> str:
        return ChunkStore(self.chunk_dir(job_id)).path(ChunkRef(digest, 0, codec))

    def prune(self, job_id: str, step: str, keep: int) -> List[int]:
        """Remove all but the newest `keep` committed generations of a step; return the removed numbers."""
        gens = self.generations(job_id, step)
        removed = []
        for gen in gens[: max(0, len(gens) - keep)]:
            shutil.rmtree(gen.path, ignore_errors=True)
            removed.append(gen.number)
        return removed

    def referenced_digests(self, job_id: str, skip: Iterable[Tuple[str, int]] = (), strict: bool = False) -> Set[str]:
        """Digests referenced by the job's committed manifests, leaving out the generations in `skip`
        ((step, number) pairs that are about to be removed). `strict`: an unreadable manifest raises instead of
        being ignored (`ckpt gc` then keeps all of the job's chunks)."""
        leave_out = set(skip)
        referenced: Set[str] = set()
        for step in self.steps(job_id):
            for gen in self.generations(job_id, step):
                if (step, gen.number) in leave_out:
                    continue
                try:
                    manifest = self.load_manifest(gen)
                except (DamagedCheckpointError, PermissionDenied):
                    if strict:
                        raise
                    continue
                referenced.update(r.digest for r in manifest_refs(manifest))
        return referenced

    def sweep_chunks(
        self,
        job_id: str,
        *,
        referenced: Optional[Set[str]] = None,
        locked: bool = False,
        unlink: Optional[Callable[[int, str, int], None]] = None,
        job_fd: Optional[int] = None,
    ) -> Tuple[int, int]:
        """Remove chunks no committed manifest references. Takes the job lock exclusively and skips (returns
        (0, 0)) while any checkpoint of the job is being written. Returns (files removed, bytes freed).

        The walk opens every directory relative to its parent without following symbolic links, so a `chunks`
        directory or prefix directory replaced by a link to somewhere else is never entered.
        For `ckpt gc`: `referenced` (what to keep) instead of the manifests on disk, `locked` when the caller already
        holds the job lock exclusively, `unlink(dir_fd, name, size)` to remove (or only count) one file, `job_fd` the
        job directory opened by the caller."""
        if not locked:
            with self.job_lock(job_id, exclusive=True, blocking=False) as got:
                if not got:
                    return 0, 0
                return self.sweep_chunks(job_id, referenced=referenced, locked=True, unlink=unlink, job_fd=job_fd)
        if referenced is None:
            referenced = self.referenced_digests(job_id)
        if unlink is None:
            def unlink(dir_fd: int, name: str, size: int) -> None:
                os.unlink(name, dir_fd=dir_fd)
        own_fd = job_fd is None
        if own_fd:
            job_fd = open_dir_nofollow(self.job_dir(job_id))
            if job_fd is None:
                return 0, 0
        removed = freed = 0
        try:
            chunks_fd = open_dir_nofollow("chunks", job_fd)
            if chunks_fd is None:
                return 0, 0
            try:
                for prefix in _scandir_fd(chunks_fd):
                    prefix_fd = open_dir_nofollow(prefix, chunks_fd) if len(prefix) == 2 else None
                    if prefix_fd is None:
                        continue
                    try:
                        for name in _scandir_fd(prefix_fd):
                            digest = "" if ".tmp-" in name else (name[:-4] if name.endswith(".zst") else name)
                            if digest and digest in referenced:
                                continue
                            try:
                                st = os.stat(name, dir_fd=prefix_fd, follow_symlinks=False)
                                if not stat.S_ISREG(st.st_mode):
                                    continue
                                unlink(prefix_fd, name, st.st_size)
                            except OSError:
                                continue
                            removed += 1
                            freed += st.st_size
                    finally:
                        os.close(prefix_fd)
            finally:
                os.close(chunks_fd)
        finally:
            if own_fd:
                os.close(job_fd)
        return removed, freed

    # --- results and events -----------------------------------------------------------------------------------
    def result(self, job_id: str, step: str) -> Optional[Dict[str, Any]]:
        path = os.path.join(self.step_dir(job_id, step), RESULT)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable step result ({e})") from e

    def record_result(self, job_id: str, step: str, exit_status: int) -> None:
        data = {"exit_status": exit_status, "finished": iso(utcnow()), "host": socket.gethostname()}
        write_atomic(os.path.join(self.step_dir(job_id, step), RESULT), json.dumps(data).encode())

    def append_event(self, job_id: str, event: Dict[str, Any], new_line: bool = False) -> None:
        """One JSON line per event; O_APPEND writes of a line this size are not interleaved between writers.
        `new_line`: start with a line break, ending a line a full disk cut short (readers skip empty lines)."""
        path = os.path.join(self.job_dir(job_id), EVENTS)
        line = (("\n" if new_line else "") + json.dumps(event, sort_keys=True, separators=(",", ":")) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, f"short write to {path}", path)
        finally:
            os.close(fd)

    def events(self, job_id: str) -> List[Dict[str, Any]]:
        path = os.path.join(self.job_dir(job_id), EVENTS)
        out = []
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        try:
                            out.append(json.loads(line))
                        except ValueError:
                            log.warning("%s: skipping a damaged event line", path)
        except FileNotFoundError:
            pass
        return out

    def latest_generation(self, job_id: str, step: str) -> Generation:
        gens = self.generations(job_id, step)
        if not gens:
            raise NotFoundError(f"no checkpoint of job {job_id} step {step} in {self.root}")
        return gens[-1]


def manifest_refs(manifest: Dict[str, Any]) -> Iterator[ChunkRef]:
    for item in manifest.get("images", []):
        for r in item.get("chunks", []):
            yield ChunkRef.from_json(r)
    for item in manifest.get("files", []):
        for r in item.get("chunks", []) or []:
            yield ChunkRef.from_json(r)


def open_dir_nofollow(name: str, dir_fd: Optional[int] = None) -> Optional[int]:
    """A directory opened without following a symbolic link in its last component; None when `name` is missing,
    not a directory or a link."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None


def _scandir_fd(dir_fd: int) -> List[str]:
    with os.scandir(dir_fd) as it:
        return sorted(e.name for e in it)
