"""The checkpoint store: a directory tree on a shared file system (FSx for Lustre on a cluster).

Layout (job directories are mode 0700):

    <store>/<job-id>/                 one job (array tasks: <array-job>_<task>)
        lock                          writers hold it shared, `ckpt gc` exclusive (flock)
        events.jsonl                  lifecycle events (run segments, checkpoints, restores, notices, requeues)
        chunks/<xx>/<digest><suffix>  content-addressed data shared by all steps and generations of the job
        <step>/
            gen-000003/manifest.json  a committed checkpoint; a generation directory appears only when complete
            gen-000003/summary.json   a few facts of the generation for `ckpt list` (written before the manifest)
            gen-000004.partial-<pid>/ a checkpoint being written (never read by restore)
            result.json               the step finished: its exit status; a rerun returns it without running

A checkpoint becomes visible only when complete and durable: chunks are written and the file system synced, then
the manifest is written and fsynced inside the partial directory, which is then renamed to its final name.
A crash at any moment leaves the previous generation intact. Manifests carry the checksums of every chunk and,
where a key exists, an HMAC-SHA256 over the manifest made with a key that users cannot read.

Reading is defensive, because a job's user owns (and can rearrange) the job's directory: every file is opened
without following a symbolic link, only when it is a regular file, and read only up to a bound (a manifest, a
summary, a step result, events; chunks are bounded by the sizes their manifest records). A job, step or `chunks`
directory that is a symbolic link is refused. Whenever the reader holds a key, a manifest without a valid signature
is a damaged generation, as is one that does not have the manifest's shape (store/manifest.py owns the manifest:
its dataclasses, how it is written, signed, read and checked; store/layout.py owns the names in the tree above).
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
import shutil
import socket
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ckpt_agent.errors import (
    CkptError,
    ConfigError,
    DamagedCheckpointError,
    NewerFormatError,
    NotFoundError,
    PermissionDenied,
    StoreError,
)
from ckpt_agent.store import layout
from ckpt_agent.store import manifest as manifest_file
from ckpt_agent.store.chunks import (
    DEFAULT_DIGEST,
    ChunkStore,
    present_chunks,
    sweep_chunk_dir,
)
from ckpt_agent.store.layout import EVENTS, MANIFEST, RESULT, SUMMARY
from ckpt_agent.store.manifest import Manifest, Summary
from ckpt_agent.util.safeio import (
    NotRegularFile,
    fsync_dir,
    open_dir_nofollow,
    read_regular,
    read_regular_stat,
    write_atomic,
)
from ckpt_agent.util.usercreds import owner_of_path

log = logging.getLogger(__name__)

# read bounds (the manifest's: manifest.MAX_MANIFEST_BYTES)
MAX_SUMMARY_BYTES = 64 << 10  # a handful of fields
MAX_RESULT_BYTES = 64 << 10
MAX_EVENTS_BYTES = 64 << 20  # ~300,000 events: far beyond any job's lifetime
MAX_KEY_BYTES = 4096


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> dt.datetime:
    return dt.datetime.strptime(s.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z")


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
    """HMAC-SHA256 over manifest bytes with a key only root can read (the node agent's key file).

    Whenever a key is held, every manifest must carry a valid signature: a missing or wrong one makes the generation
    damaged (restore falls back to an older intact one). Without a key (an ordinary user's `ckpt list`/`verify`),
    signatures cannot be checked, and a caller that requires one is refused."""

    def __init__(self, key: Optional[bytes]):
        self.key = key

    @classmethod
    def from_file(cls, path: str) -> Signer:
        try:
            key = read_regular(path, MAX_KEY_BYTES, follow=True).strip()
        except (FileNotFoundError, PermissionError):
            return cls(None)
        except (OSError, ValueError):
            return cls(None)
        return cls(key or None)

    @classmethod
    def ensure(cls, path: str, config_path: Optional[str] = None) -> Signer:
        """The key at `path`, created (random, mode 0600, root's) at first use when none is there.

        The key file alone is private: a missing parent directory is created 0755, since the configuration
        (agent.yaml, which every user's `ckpt run` reads) may live in the same directory. A directory holding
        `config_path` that an earlier version made 0700 is opened up again (it held only the key and the config).
        The key appears under its name complete (written aside, then linked), so concurrent first users all read
        the same key."""
        import secrets

        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            if config_path and os.path.dirname(os.path.abspath(config_path)) == parent:
                _keep_traversable(parent)
            if not os.path.lexists(path):
                tmp = f"{path}.tmp-{os.getpid()}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, (secrets.token_hex(32) + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                try:
                    os.link(tmp, path)
                    log.warning("created a new signing key %s: copy it to every node that restores this node's "
                                "checkpoints", path)
                except FileExistsError:
                    pass  # another first user won: use theirs
                finally:
                    os.unlink(tmp)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{path}: signing key is not a regular file")
            if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
                os.chmod(path, 0o600)
        except OSError as e:
            raise ConfigError(f"{path}: cannot create the signing key: {e.strerror}") from e
        signer = cls.from_file(path)
        if not signer.key:
            raise ConfigError(f"{path}: signing key is empty or unreadable")
        return signer

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
            raise DamagedCheckpointError(f"{where}: checkpoint is not signed by the agent (a key exists): "
                                         "refusing to trust it")
        if not isinstance(signature, str) or not hmac.compare_digest(self.sign(payload) or "", signature):
            raise DamagedCheckpointError(f"{where}: checkpoint signature does not match: it was altered or forged")


def _keep_traversable(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and (st.st_mode & 0o055) != 0o055:
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o055)
        log.warning("%s was not readable by users (mode %o): made it %o again so that users can read the "
                    "configuration; the signing key stays private", path, stat.S_IMODE(st.st_mode),
                    stat.S_IMODE(st.st_mode) | 0o055)


# the manifest files' bytes whose decoded manifests a store keeps (a 500 GiB job's manifest: about 43 MB)
MANIFEST_CACHE_BYTES = 128 << 20


class ManifestCache:
    """Manifests this store decoded, by path, with the stat of the file when it was read (device, inode, size, mtime,
    ctime): every checkpoint reads the previous generation's manifest, the chunks known to the job (all of them) and
    the sweep after it (all again), and decoding a large job's manifest takes seconds (a synthetic 500 GiB job's, 43
    MB: about 2 s on the 2-vCPU dev VM). A file that stats the same holds the bytes that were checked (any write changes
    the ctime, which nobody can set back; another file renamed in its place has another inode), so it is returned
    without reading or checking it again. Least recently used first out beyond MANIFEST_CACHE_BYTES of manifest
    files. Callers must not change what they get."""

    def __init__(self, max_bytes: int = MANIFEST_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Tuple[Tuple[int, ...], bool, int, Manifest]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(st: os.stat_result) -> Tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def get(self, path: str, require_signature: bool) -> Optional[Manifest]:
        with self._lock:
            entry = self._entries.get(path)
        if entry is None:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        key, signed, _size, manifest = entry
        if not stat.S_ISREG(st.st_mode) or self._key(st) != key or (require_signature and not signed):
            return None
        with self._lock:
            if path in self._entries:
                self._entries.move_to_end(path)
        return manifest

    def forget(self, path: str) -> None:
        with self._lock:
            old = self._entries.pop(path, None)
            if old is not None:
                self._bytes -= old[2]

    def put(self, path: str, st: os.stat_result, size: int, signed: bool, manifest: Manifest) -> None:
        """`signed`: its signature was checked (the store holds a key, or one was required)."""
        if size > self.max_bytes:
            return
        self.forget(path)
        with self._lock:
            self._entries[path] = (self._key(st), signed, size, manifest)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _path, (_k, _s, gone, _m) = self._entries.popitem(last=False)
                self._bytes -= gone


class CheckpointStore:
    def __init__(self, root: str, signer: Optional[Signer] = None):
        self.root = os.path.abspath(root)
        self.signer = signer or Signer(None)
        self.manifests = ManifestCache()

    # --- layout -----------------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> str:
        return layout.job_dir(self.root, job_id)

    def step_dir(self, job_id: str, step: str) -> str:
        return layout.step_dir(self.root, job_id, step)

    def chunk_dir(self, job_id: str) -> str:
        return layout.chunk_dir(self.root, job_id)

    def _no_link(self, path: str) -> str:
        """`path` (a job, step or chunks directory) for reading: refused when it is a symbolic link or not a
        directory (a user may rearrange their own job directory; nobody may make a reader go elsewhere)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path
        except OSError as e:
            raise self._read_error(os.path.relpath(path, self.root).split(os.sep)[0], path, e) from e
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{path} is not a directory (a symbolic link?); refusing to read through it")
        return path

    def read_job_dir(self, job_id: str) -> str:
        return self._no_link(self.job_dir(job_id))

    def read_step_dir(self, job_id: str, step: str) -> str:
        self.read_job_dir(job_id)
        return self._no_link(self.step_dir(job_id, step))

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
        path = layout.LOCK if dir_fd is not None else os.path.join(self.job_dir(job_id), layout.LOCK)
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
        sd = self.read_step_dir(job_id, step)
        try:
            names = os.listdir(sd)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._read_error(job_id, sd, e) from e
        gens = []
        for name in names:
            number = layout.generation_number(name)
            path = os.path.join(sd, name)
            # listed when its manifest exists at all: whatever stands there is then checked (and maybe damaged)
            if (number is not None and not os.path.islink(path) and os.path.isdir(path)
                    and os.path.lexists(os.path.join(path, MANIFEST))):
                gens.append(Generation(job_id, step, number, path))
        return sorted(gens, key=lambda g: g.number)

    def _read_error(self, job_id: str, path: str, e: OSError) -> CkptError:
        """A job's directory is its user's alone (0700): another user's refusal names the owner (77); any other
        failure to read the store is a store error (74) naming the path."""
        if isinstance(e, PermissionError) and os.geteuid() != 0:
            return PermissionDenied(f"job {job_id} belongs to {owner_of_path(self.job_dir(job_id))}: only its owner "
                                    f"or root may read its checkpoints ({path})")
        return StoreError(f"cannot read {path}: {e.strerror}")

    def partials(self, job_id: str, step: str) -> List[str]:
        sd = self.step_dir(job_id, step)
        try:
            return [os.path.join(sd, n) for n in os.listdir(sd) if layout.partial_number(n) is not None]
        except FileNotFoundError:
            return []

    def jobs(self) -> List[str]:
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as e:
            raise StoreError(f"cannot list checkpoint store {self.root}: {e.strerror}") from e
        return [e.name for e in entries if e.is_dir(follow_symlinks=False) and layout.is_job_name(e.name)]

    def steps(self, job_id: str) -> List[str]:
        """Step directories of a job (links and names that are not step names are left out); PermissionError when
        the caller may not read the job's directory (another user's job in a shared store)."""
        jd = self.read_job_dir(job_id)
        try:
            entries = sorted(os.scandir(jd), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise self._read_error(job_id, jd, e) from e
        return [e.name for e in entries if e.is_dir(follow_symlinks=False) and layout.is_step_name(e.name)]

    def begin(self, job_id: str, step: str) -> Tuple[int, str]:
        """Reserve the next generation number; return it and its partial directory."""
        gens = self.generations(job_id, step)
        number = (gens[-1].number if gens else 0) + 1
        for p in self.partials(job_id, step):
            number = max(number, (layout.partial_number(os.path.basename(p)) or 0) + 1)
        partial = os.path.join(self.step_dir(job_id, step), layout.partial_name(number, os.getpid()))
        try:
            os.mkdir(partial, 0o700)
        except OSError as e:
            raise StoreError(f"cannot create {partial}: {e.strerror}") from e
        return number, partial

    def commit(
        self, partial: str, number: int, manifest: Manifest, owner: Optional[Tuple[int, int]] = None
    ) -> Generation:
        """Write the manifest last, durably, then make the generation visible by renaming it."""
        from ckpt_agent.store.chunks import syncfs

        step_dir = os.path.dirname(partial)
        job_dir = os.path.dirname(step_dir)
        syncfs(job_dir)  # chunks written without per-file fsync become durable here, before the manifest exists
        data = manifest_file.encode(manifest, self.signer)
        # the summary first: the manifest's write syncs the directory, so both are durable before the rename
        write_atomic(os.path.join(partial, SUMMARY), json.dumps(manifest.summary().to_json()).encode(), durable=False)
        write_atomic(os.path.join(partial, MANIFEST), data)
        if owner:  # readable by the job's user (`ckpt list`, `ckpt verify`); the signature guards against edits
            os.chown(os.path.join(partial, SUMMARY), *owner)
            os.chown(os.path.join(partial, MANIFEST), *owner)
            os.chown(partial, *owner)
        final = os.path.join(step_dir, layout.generation_name(number))
        os.rename(partial, final)
        fsync_dir(step_dir)
        return Generation(os.path.basename(job_dir), os.path.basename(step_dir), number, final)

    def abort(self, partial: str) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    def load_manifest(self, gen: Generation, require_signature: bool = False) -> Manifest:
        """The generation's manifest, checked (manifest.decode): signed (whenever this store holds a key, and always
        when `require_signature`), of a readable format and shape. DamagedCheckpointError otherwise."""
        where = gen.manifest_path
        cached = self.manifests.get(where, require_signature)
        if cached is not None:
            return cached
        try:
            raw, st = read_regular_stat(where, manifest_file.MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            raise DamagedCheckpointError(f"{where}: manifest is missing") from None
        except NotRegularFile as e:
            raise DamagedCheckpointError(f"manifest: {e.strerror}") from None
        except OSError as e:
            raise StoreError(f"{where}: cannot read manifest: {e.strerror}") from e
        manifest = manifest_file.decode(raw, where, self.signer, require_signature)
        self.manifests.put(where, st, len(raw), require_signature or bool(self.signer.key), manifest)
        return manifest

    def load_summary(self, gen: Generation) -> Summary:
        """The generation's listing facts: from its summary file, else (older generations, or a summary that is not
        well formed) from its manifest. Not an integrity check: `ckpt verify` is."""
        try:
            summary = Summary.from_json(json.loads(read_regular(os.path.join(gen.path, SUMMARY), MAX_SUMMARY_BYTES)))
            if summary is not None:
                return summary
        except (OSError, ValueError, RecursionError):
            pass
        return self.load_manifest(gen).summary()

    def chunks_for(
        self,
        job_id: str,
        compression: str = "zstd",
        known: Optional[Dict[str, str]] = None,
        owner: Optional[Tuple[int, int]] = None,
        digest: str = DEFAULT_DIGEST,
    ) -> ChunkStore:
        self.read_job_dir(job_id)
        return ChunkStore(self._no_link(self.chunk_dir(job_id)), compression, known, owner, digest)

    def known_chunks(self, job_id: str) -> Dict[str, str]:
        """digest -> codec of every chunk referenced by a committed manifest of the job (what need not be rewritten).
        Manifests this store decoded before (the engine's previous one) come from the cache (ManifestCache)."""
        known: Dict[str, str] = {}
        for step in self.steps(job_id):
            for gen in self.generations(job_id, step):
                try:
                    manifest = self.load_manifest(gen)
                except (DamagedCheckpointError, PermissionDenied):
                    continue
                for ref in manifest.refs():
                    known[ref.digest] = ref.codec
        if not known:
            return known
        job_fd = open_dir_nofollow(self.job_dir(job_id))
        chunks_fd = open_dir_nofollow(layout.CHUNKS_DIR, job_fd) if job_fd is not None else None
        try:  # listed, not stat'ed one by one (present_chunks)
            return present_chunks(chunks_fd, known) if chunks_fd is not None else {}
        finally:
            for fd in (chunks_fd, job_fd):
                if fd is not None:
                    os.close(fd)

    def prune(self, job_id: str, step: str, keep: int) -> List[int]:
        """Remove all but the newest `keep` committed generations of a step; return the removed numbers."""
        gens = self.generations(job_id, step)
        removed = []
        for gen in gens[: max(0, len(gens) - keep)]:
            shutil.rmtree(gen.path, ignore_errors=True)
            self.manifests.forget(gen.manifest_path)
            removed.append(gen.number)
        return removed

    def referenced_digests(self, job_id: str, skip: Iterable[Tuple[str, int]] = (), strict: bool = False) -> Set[str]:
        """Digests referenced by the job's committed manifests, leaving out the generations in `skip`
        ((step, number) pairs that are about to be removed). `strict`: an unreadable manifest raises instead of
        being ignored (`ckpt gc` then keeps all of the job's chunks). One a newer agent wrote (NewerFormatError)
        always raises: its chunks are not garbage, the caller sweeps nothing."""
        leave_out = set(skip)
        referenced: Set[str] = set()
        for step in self.steps(job_id):
            for gen in self.generations(job_id, step):
                if (step, gen.number) in leave_out:
                    continue
                try:
                    manifest = self.load_manifest(gen)
                except NewerFormatError:
                    raise
                except (DamagedCheckpointError, PermissionDenied):
                    if strict:
                        raise
                    continue
                referenced.update(r.digest for r in manifest.refs())
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
        """Remove chunks no committed manifest references (the chunk store's sweep_chunk_dir, which knows every
        codec's suffix). Takes the job lock exclusively and skips (returns (0, 0)) while any checkpoint of the job
        is being written. Returns (files removed, bytes freed).

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
        own_fd = job_fd is None
        if own_fd:
            job_fd = open_dir_nofollow(self.job_dir(job_id))
            if job_fd is None:
                return 0, 0
        try:
            chunks_fd = open_dir_nofollow(layout.CHUNKS_DIR, job_fd)
            if chunks_fd is None:
                return 0, 0
            try:
                return sweep_chunk_dir(chunks_fd, referenced, unlink)
            finally:
                os.close(chunks_fd)
        finally:
            if own_fd:
                os.close(job_fd)

    # --- results and events -----------------------------------------------------------------------------------
    def result(self, job_id: str, step: str) -> Optional[Dict[str, Any]]:
        path = os.path.join(self.read_step_dir(job_id, step), RESULT)
        try:
            data = json.loads(read_regular(path, MAX_RESULT_BYTES))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: unreadable step result ({e.strerror or e})") from e
        except ValueError as e:
            raise StoreError(f"{path}: unreadable step result ({e})") from e
        if not isinstance(data, dict):
            raise StoreError(f"{path}: unreadable step result (not an object)")
        return data

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
        path = os.path.join(self.read_job_dir(job_id), EVENTS)
        out = []
        try:
            text = read_regular(path, MAX_EVENTS_BYTES).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return out
        except OSError as e:
            raise StoreError(f"{path}: cannot read events: {e.strerror or e}") from e
        for line in text.splitlines():
            line = line.strip()
            if line:
                try:
                    event = json.loads(line)
                except (ValueError, RecursionError):
                    event = None
                if isinstance(event, dict):
                    out.append(event)
                else:
                    log.warning("%s: skipping a damaged event line", path)
        return out

    def latest_generation(self, job_id: str, step: str) -> Generation:
        gens = self.generations(job_id, step)
        if not gens:
            raise NotFoundError(f"no checkpoint of job {job_id} step {step} in {self.root}")
        return gens[-1]
