"""`capture`: the working directory and open files captured with the images, incrementally, and put back
exactly (a vanished scratch directory recreated with its modes; planted symlinks never followed)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from ckpt_agent.checkpoint import capture
from ckpt_agent.checkpoint.capture import FileEntry, open_writable_files, restore_files
from ckpt_agent.store.chunks import ChunkStore

MIB = 1 << 20


@pytest.fixture
def tree(tmp_path):
    """A job's working directory: files, a subdirectory with its own mode, a symlink, an empty dir."""
    root = tmp_path / "work"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "input.cir").write_text("* a netlist\nR1 a b 1k\n")
    (root / "sub" / "big.raw").write_bytes(os.urandom(2 * MIB + 10))
    (root / "sub" / "deeper" / "state.db").write_bytes(b"state v1")
    (root / "link-to-input").symlink_to("input.cir")
    os.chmod(root / "sub", 0o750)
    os.chmod(root / "sub" / "deeper" / "state.db", 0o640)
    return root


def by_path(entries):
    return {e.path: e for e in entries}


def test_capture_records_files_dirs_and_symlinks(chunks, pool, tree):
    entries, stats = capture.capture(chunks, pool, [str(tree)], [], set())
    found = by_path(entries)
    kinds = {os.path.relpath(p, tree): e.kind for p, e in found.items()}
    assert kinds == {".": "dir", "sub": "dir", "sub/deeper": "dir", "empty": "dir", "input.cir": "file",
                     "sub/big.raw": "file", "sub/deeper/state.db": "file", "link-to-input": "symlink"}
    assert found[str(tree / "link-to-input")].target == "input.cir"
    assert found[str(tree / "sub")].mode == 0o750
    big = found[str(tree / "sub" / "big.raw")]
    assert big.size == 2 * MIB + 10 and len(big.chunks) == 3
    assert stats.bytes_in == sum(e.size for e in entries if e.kind == "file")
    assert all(FileEntry.from_json(e.to_json()) == e for e in entries)


def test_capture_does_not_follow_symlinks_out_of_the_tree(chunks, pool, tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the job")
    (tree / "escape").symlink_to(outside)
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    assert not any(e.path.startswith(str(outside)) for e in entries)
    assert by_path(entries)[str(tree / "escape")].kind == "symlink"


def test_excluded_paths_are_not_captured(chunks, pool, tree):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], {str(tree / "sub")})
    assert not any(e.path == str(tree / "sub") or e.path.startswith(str(tree / "sub") + "/") for e in entries)


def test_unchanged_files_are_reused_without_reading_them(chunks, pool, tree, monkeypatch):
    first, st1 = capture.capture(chunks, pool, [str(tree)], [], set())
    assert st1.bytes_new == st1.bytes_in > 2 * MIB
    (tree / "sub" / "deeper" / "state.db").write_bytes(b"state v2, longer")
    read = []
    real_store_file = capture.store_file

    def spy(store, path, pool_, cuts=None):
        read.append(path)
        return real_store_file(store, path, pool_, cuts)

    monkeypatch.setattr(capture, "store_file", spy)
    later = ChunkStore(chunks.root, known=dict(chunks.known))  # what the engine builds from the kept manifests
    second, st2 = capture.capture(later, pool, [str(tree)], [], set(), by_path(first))
    assert read == [str(tree / "sub" / "deeper" / "state.db")]
    assert st2.bytes_new == len(b"state v2, longer")
    assert st2.chunks_reused == 3 + 1  # big.raw's three chunks and input.cir's one
    assert by_path(second)[str(tree / "sub" / "big.raw")].chunks == by_path(first)[str(tree / "sub" / "big.raw")].chunks


def test_previous_entry_is_not_trusted_when_its_chunks_are_gone(chunks, pool, tree):
    first, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    fresh = ChunkStore(chunks.root, known={})  # e.g. the chunks were swept: nothing is known to exist
    _, st = capture.capture(fresh, pool, [str(tree)], [], set(), by_path(first))
    assert st.chunks_reused == 0


def test_open_file_outside_the_tree_is_captured_with_its_parents(chunks, pool, tree, tmp_path):
    scratch = tmp_path / "local" / "scratch"
    scratch.mkdir(parents=True)
    os.chmod(scratch, 0o700)
    (scratch / "sim.tmp").write_bytes(b"partial results")
    entries, _ = capture.capture(chunks, pool, [str(tree)], [str(scratch / "sim.tmp")], set())
    found = by_path(entries)
    assert found[str(scratch / "sim.tmp")].kind == "file"
    assert found[str(scratch)].kind == "dir" and found[str(scratch)].mode == 0o700
    assert found[str(tmp_path / "local")].kind == "dir"


HOLDER = r"""
import mmap, os, sys, time
w = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
r = os.open(sys.argv[2], os.O_RDONLY)
rw = os.open(sys.argv[3], os.O_RDWR | os.O_CREAT, 0o600)
gone = os.open(sys.argv[4], os.O_WRONLY | os.O_CREAT, 0o600)
os.unlink(sys.argv[4])
fd = os.open(sys.argv[5], os.O_RDWR)
shared = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
os.close(fd)
pipe_r, pipe_w = os.pipe()
print("ready", flush=True)
time.sleep(60)
"""


def test_open_writable_files_of_a_real_process(tmp_path):
    names = ["written", "read-only", "read-write", "deleted", "mapped"]
    paths = [tmp_path / n for n in names]
    for p in (paths[1], paths[4]):
        p.write_bytes(bytes(4096))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, paths)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        found = open_writable_files([child.pid])
    finally:
        child.kill()
        child.wait()
    assert str(paths[0]) in found, "O_WRONLY"
    assert str(paths[2]) in found, "O_RDWR"
    assert str(paths[4]) in found, "MAP_SHARED writable mapping with its descriptor closed"
    assert str(paths[1]) not in found, "O_RDONLY is not captured"
    assert not any("deleted" in p for p in found), "deleted files are CRIU's (ghost files), not ours"
    assert all(os.path.isfile(p) for p in found)


def test_open_writable_files_of_a_vanished_process_is_empty():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert open_writable_files([child.pid]) == set()


# --- restore ------------------------------------------------------------------------------------------------------
def test_restore_recreates_a_deleted_scratch_dir_with_modes_and_times(chunks, pool, tree):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    before = {p: os.lstat(p) for p in by_path(entries)}
    contents = {p: open(p, "rb").read() for p, e in by_path(entries).items() if e.kind == "file"}
    shutil.rmtree(tree)  # the instance and its local disk are gone

    written, unchanged = restore_files(chunks, pool, entries)
    assert (written, unchanged) == (3, 0)
    for path, st in before.items():
        now = os.lstat(path)
        assert stat.S_IFMT(now.st_mode) == stat.S_IFMT(st.st_mode), path
        if not stat.S_ISLNK(st.st_mode):
            assert stat.S_IMODE(now.st_mode) == stat.S_IMODE(st.st_mode), path
            assert now.st_mtime_ns == st.st_mtime_ns, path
    for path, data in contents.items():
        assert open(path, "rb").read() == data
    assert os.readlink(tree / "link-to-input") == "input.cir"


def test_restore_rewrites_changed_files_and_leaves_unchanged_ones_alone(chunks, pool, tree):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    state, big, inp = tree / "sub" / "deeper" / "state.db", tree / "sub" / "big.raw", tree / "input.cir"
    original_state = state.read_bytes()
    state.write_bytes(b"the future: written after the checkpoint")  # what CRIU alone would resume against
    (tree / "sub" / "new-after-checkpoint").write_text("x")
    big_ino, inp_ino = big.stat().st_ino, inp.stat().st_ino
    inp_st = inp.stat()
    inp.write_text("* a netlist\nR1 a b 2k\n")  # same size, mtime reset: taken as unchanged, like rsync does
    os.utime(inp, ns=(inp_st.st_atime_ns, inp_st.st_mtime_ns))

    written, unchanged = restore_files(chunks, pool, entries)
    assert (written, unchanged) == (1, 2)
    assert state.read_bytes() == original_state
    assert state.stat().st_mtime_ns == by_path(entries)[str(state)].mtime_ns
    assert stat.S_IMODE(state.stat().st_mode) == 0o640
    assert big.stat().st_ino == big_ino and inp.stat().st_ino == inp_ino, "unchanged files are not rewritten"
    assert inp.read_text().endswith("2k\n")


def test_restore_shrinks_a_file_that_grew(chunks, pool, tree):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    log = tree / "input.cir"
    original = log.read_bytes()
    with open(log, "ab") as fh:
        fh.write(b"lines the tool wrote after the checkpoint\n")
    restore_files(chunks, pool, entries)
    assert log.read_bytes() == original


def test_restore_never_follows_a_symlink_planted_where_a_directory_was(chunks, pool, tree, tmp_path):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.rmtree(tree / "sub")
    (tree / "sub").symlink_to(victim)

    restore_files(chunks, pool, entries)
    assert not (tree / "sub").is_symlink()
    assert (tree / "sub").is_dir()
    assert (tree / "sub" / "deeper" / "state.db").read_bytes() == b"state v1"
    assert os.listdir(victim) == [], "nothing may be written through the planted link"


def test_restore_never_writes_through_a_symlink_planted_where_a_file_was(chunks, pool, tree, tmp_path):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    victim = tmp_path / "victim-file"
    victim.write_text("precious")
    (tree / "input.cir").unlink()
    (tree / "input.cir").symlink_to(victim)

    restore_files(chunks, pool, entries)
    assert victim.read_text() == "precious"
    assert not (tree / "input.cir").is_symlink()
    assert (tree / "input.cir").read_text().startswith("* a netlist")


def test_restore_never_writes_through_a_symlink_planted_at_the_temporary_name(chunks, pool, tree, tmp_path):
    """The temporary name is predictable (dest + pid); a link planted there must not redirect the write."""
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    victim = tmp_path / "victim-file"
    victim.write_text("precious")
    target = tree / "sub" / "deeper" / "state.db"
    target.unlink()
    os.symlink(victim, f"{target}.ckpt-tmp-{os.getpid()}")

    restore_files(chunks, pool, entries)
    assert victim.read_text() == "precious"
    assert target.read_bytes() == b"state v1" and not target.is_symlink()


def test_restore_puts_back_a_symlink_that_was_repointed(chunks, pool, tree):
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    (tree / "link-to-input").unlink()
    (tree / "link-to-input").symlink_to("/etc/passwd")
    restore_files(chunks, pool, entries)
    assert os.readlink(tree / "link-to-input") == "input.cir"


def test_restore_sets_owner_when_asked(chunks, pool, tree):
    if os.geteuid() != 0:
        pytest.skip("changing ownership needs root")
    os.chown(tree / "input.cir", 1234, 5678)
    entries, _ = capture.capture(chunks, pool, [str(tree)], [], set())
    (tree / "input.cir").unlink()
    restore_files(chunks, pool, entries)  # as root: owners too
    st = (tree / "input.cir").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_ns_pids_and_tree_rss_of_ourselves():
    pids = capture.ns_pids(os.getpid())
    assert os.getpid() in pids
    assert capture.tree_rss_bytes([os.getpid()]) > MIB
    assert capture.ns_pids(2**22 + 12345) == []
