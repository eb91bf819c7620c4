"""A restore that CRIU refuses (another CPU) or that fails leaves no rebuilt images behind: they may fill RAM in
/dev/shm, and the store still holds them."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from ckpt_helpers import wait_for

from ckpt_agent.adapters.criu import Criu
from ckpt_agent.checkpoint import engine as engine_mod
from ckpt_agent.checkpoint.engine import Engine
from ckpt_agent.errors import CriuError, IncompatibleCpuError
from ckpt_agent.node.config import CheckpointSettings
from ckpt_agent.store.chunks import ChunkStore
from ckpt_agent.store.generations import CheckpointStore
from ckpt_agent.store.manifest import parse

JOB, STEP = "4242", "main"


class RefusingCriu(Criu):
    def __init__(self, error):
        super().__init__("/bin/false")
        self.error = error
        self.saw_images = []

    def restore(self, images_dir, **_kw):
        self.saw_images = sorted(os.listdir(images_dir))
        raise self.error


@pytest.fixture
def staged(tmp_path, monkeypatch):
    """A committed generation holding two images, and staging bases under tmp_path."""
    shm, disk = tmp_path / "shm", tmp_path / "disk"
    monkeypatch.setattr(engine_mod, "SHM_STAGING", str(shm))
    monkeypatch.setattr(engine_mod, "DISK_STAGING", str(disk))
    (tmp_path / "store").mkdir()
    store = CheckpointStore(str(tmp_path / "store"))
    store.ensure_job(JOB, STEP)
    chunks = ChunkStore(store.chunk_dir(JOB), compression="none")
    images = []
    for name, data in (("cpuinfo.img", b"cpu" * 100), ("pages-1.img", os.urandom(1 << 16))):
        ref, _ = chunks.put(data)
        images.append({"name": name, "size": ref.size, "chunks": [ref.to_json()]})
    number, partial = store.begin(JOB, STEP)
    store.commit(partial, number, parse({"format": 1, "generation": number, "created": "2026-12-03T00:00:00.000000Z",
                                         "cwd": "/nonexistent", "images": images, "files": []}, "test"))
    return store, (shm, disk)


@pytest.mark.parametrize("error", [IncompatibleCpuError("this machine's CPU lacks features"),
                                   CriuError("criu restore failed")])
def test_a_refused_or_failed_restore_leaves_no_images_behind(staged, error):
    store, bases = staged
    criu = RefusingCriu(error)
    with pytest.raises(type(error)):
        Engine(criu, store, CheckpointSettings()).restore(JOB, STEP, {})
    assert criu.saw_images == ["cpuinfo.img", "pages-1.img"]  # the images were rebuilt, then CRIU refused
    left = [os.path.join(b, n) for b in bases if os.path.isdir(b) for n in os.listdir(b)]
    assert left == []


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("failure", ["does-not-stop", "arming-fails"])
def test_a_restored_tree_that_cannot_be_armed_runs_all_the_same(staged, tmp_path, monkeypatch, failure):
    """engine._track_restored: whatever goes wrong while a tree restored with --leave-stopped is armed, it gets its
    SIGCONT, and its next checkpoint is not written-only."""
    from ckpt_agent.adapters import uffd

    store, _bases = staged
    eng = Engine(Criu("/bin/false"), store, CheckpointSettings())
    tree = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(tree.pid, signal.SIGSTOP)
        wait_for(lambda: _state(tree.pid) == "T", 30, "the stand-in tree to stop")
        monkeypatch.setattr(engine_mod.capture, "ns_pids", lambda pid: [tree.pid])
        if failure == "does-not-stop":
            monkeypatch.setattr(uffd, "wait_stopped", lambda pids, timeout: False)
        else:
            def broken(pids, restored=False):
                raise OSError(5, "Input/output error")

            monkeypatch.setattr(eng, "_arm", broken)
        gen = store.generations(JOB, STEP)[-1]
        eng._track_restored(gen, store.load_manifest(gen), tree.pid, str(tmp_path / "stage"))
        wait_for(lambda: _state(tree.pid) != "T", 30, "the stand-in tree to run again")
        assert eng._armed == {}
    finally:
        tree.kill()
        tree.wait()


@pytest.mark.parametrize("stream, tracked", [("off", False), ("auto", True), ("always", True)])
def test_no_dirty_tracking_where_no_dump_could_send_only_the_written_pages(tmp_path, monkeypatch, stream, tracked):
    """With `checkpoint.stream: off` no dump is written-only, so neither a dump nor a restore arms the tree (the tool
    would take a fault at its first write to each page for nothing)."""
    from ckpt_agent.adapters import uffd

    class Patched(Criu):
        def can_stream(self):
            return True

        def can_dump_written_only(self):
            return True

        def can_dump_uffd_written(self):
            return True

    monkeypatch.setattr(uffd.DirtyTracker, "supported", classmethod(lambda cls: True))
    eng = Engine(Patched("/bin/false"), CheckpointStore(str(tmp_path)), CheckpointSettings(stream=stream))
    assert (eng._dirty_tracker() is not None) == tracked


class _StreamingCriu(Criu):
    """A CRIU with --stream and patch 0002, and patches 0003 and 0004 as asked."""

    def __init__(self, patch_0003: bool = True, patch_0004: bool = True):
        super().__init__("/bin/false")
        self.patch_0003 = patch_0003
        self.patch_0004 = patch_0004

    def can_stream(self):
        return True

    def can_dump_written_only(self):
        return True

    def can_dump_uffd_written(self):
        return self.patch_0004

    def can_dump_soft_dirty_written(self):
        return self.patch_0003


@pytest.mark.parametrize("uffd_here, soft_dirty_here, patch_0003, patch_0004, expected", [
    (True, True, True, True, "DirtyTracker"),  # userfaultfd is preferred where the kernel has both
    (False, True, True, True, "SoftDirtyTracker"),  # the 6.1 kernels of today's nodes
    (False, True, False, True, None),  # a CRIU without patch 0003 cannot make holes from soft-dirty bits
    (False, False, True, True, None),
    # without patch 0004, PAGEMAP_SCAN on Linux 7.3 would hide the writes to unprotected mappings: no userfaultfd
    (True, True, True, False, "SoftDirtyTracker"),
    (True, False, True, False, None),
])
def test_soft_dirty_tracking_where_userfaultfd_cannot(tmp_path, monkeypatch, uffd_here, soft_dirty_here, patch_0003,
                                                     patch_0004, expected):
    from ckpt_agent.adapters import softdirty, uffd

    monkeypatch.setattr(uffd.DirtyTracker, "supported", classmethod(lambda cls: uffd_here))
    monkeypatch.setattr(softdirty.SoftDirtyTracker, "supported", classmethod(lambda cls: soft_dirty_here))
    eng = Engine(_StreamingCriu(patch_0003, patch_0004), CheckpointStore(str(tmp_path)),
                 CheckpointSettings(stream="always"))
    tracker = eng._dirty_tracker()
    assert (type(tracker).__name__ if tracker is not None else None) == expected


def test_a_soft_dirty_dump_is_written_only_only_with_the_time_its_tree_was_armed(tmp_path, monkeypatch):
    """fork() copies soft-dirty bits: without the arming's time CRIU could not tell new processes, so no holes."""
    from types import SimpleNamespace

    from ckpt_agent.adapters import softdirty, uffd
    from ckpt_agent.checkpoint import streamdump

    monkeypatch.setattr(uffd.DirtyTracker, "supported", classmethod(lambda cls: False))
    monkeypatch.setattr(softdirty.SoftDirtyTracker, "supported", classmethod(lambda cls: True))
    monkeypatch.setattr(streamdump, "stream_written_only", lambda *a: True)
    eng = Engine(_StreamingCriu(), CheckpointStore(str(tmp_path)), CheckpointSettings(stream="always"))
    job = SimpleNamespace(job_id="1", step="main", init_pid=4242)
    previous = SimpleNamespace(generation=3, created="t3")
    tracker = eng._dirty_tracker()
    eng._armed[("1", "main")] = (3, "t3", 4242)
    monkeypatch.setattr(tracker, "tracked_since", lambda pid: None)
    assert not eng._written_only(job, previous, str(tmp_path), eng._tracked_since(job))
    eng._armed[("1", "main")] = (3, "t3", 4242)
    monkeypatch.setattr(tracker, "tracked_since", lambda pid: 1000 if pid == 4242 else None)
    assert eng._tracked_since(job) == 1000
    assert eng._written_only(job, previous, str(tmp_path), eng._tracked_since(job))
