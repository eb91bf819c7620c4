"""A restore never trusts its manifest (issue 11, defect 3): files go back only under the job's working directory
and extra paths, never through a symbolic link; root's jobs are signed with a key created at first use; an edited
or unsigned manifest is a damaged generation and the restore falls back to the older intact one. The key's
directory never locks users out of the configuration (issue 10)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from ckpt_helpers import DATA, registered, run_ckpt, start_ckpt, wait_for

from ckpt_agent.checkpoint import capture
from ckpt_agent.checkpoint.capture import FileEntry, restore_files
from ckpt_agent.errors import DamagedCheckpointError, PermissionDenied
from ckpt_agent.store.generations import Signer


@pytest.fixture
def tree(tmp_path):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "state.db").write_bytes(b"state v1")
    (work / "input.cir").write_text("* netlist\n")
    return work


def entries_of(chunks, pool, work):
    entries, _ = capture.capture(chunks, pool, [str(work)], [], set())
    return entries


def escape_entries(entries, tmp_path):
    """What an edited manifest asked for in the probe: a file written outside the working directory, a symbolic
    link to /etc/shadow outside it, and a regular file elsewhere replaced with a directory."""
    data = next(e for e in entries if e.path.endswith("state.db"))
    outside = tmp_path / "outside"
    return [
        FileEntry(path=str(outside / "evil.sh"), kind="file", mode=0o755, uid=0, gid=0, mtime_ns=0,
                  size=data.size, chunks=data.chunks),
        FileEntry(path=str(outside / "shadow"), kind="symlink", mode=0o777, uid=0, gid=0, mtime_ns=0,
                  target="/etc/shadow"),
        FileEntry(path=str(tmp_path / "victim.txt"), kind="dir", mode=0o755, uid=0, gid=0, mtime_ns=0),
    ]


# (a signed checkpoint may put back a file the tool had open outside: see the next test)
@pytest.mark.parametrize("which, trusted", [(0, False), (1, False), (2, False), (1, True), (2, True)],
                         ids=["file-outside-unsigned", "symlink-outside-unsigned", "dir-over-file-elsewhere-unsigned",
                              "symlink-outside-signed", "dir-over-file-elsewhere-signed"])
def test_entries_outside_the_working_directory_are_refused_before_anything_is_written(
        chunks, pool, tree, tmp_path, which, trusted):
    entries = entries_of(chunks, pool, tree)
    (tmp_path / "victim.txt").write_text("precious")
    (tree / "input.cir").write_text("changed after the checkpoint")
    evil = escape_entries(entries, tmp_path)[which]
    with pytest.raises(DamagedCheckpointError, match="outside the job's directories"):
        restore_files(chunks, pool, entries + [evil], roots=[str(tree)], trusted=trusted)
    assert not (tmp_path / "outside").exists()
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert (tree / "input.cir").read_text() == "changed after the checkpoint", "refused before writing anything"


def test_a_signed_checkpoint_puts_back_an_open_file_outside_without_touching_existing_parents(
        chunks, pool, tree, tmp_path):
    scratch = tmp_path / "local" / "scratch"
    scratch.mkdir(parents=True)
    (scratch / "sim.tmp").write_bytes(b"partial")
    os.chmod(scratch, 0o700)
    entries, _ = capture.capture(chunks, pool, [str(tree)], [str(scratch / "sim.tmp")], set())
    os.chmod(tmp_path / "local", 0o751)  # changed after the checkpoint: an existing parent is left alone
    (scratch / "sim.tmp").unlink()
    scratch.rmdir()
    restore_files(chunks, pool, entries, roots=[str(tree)], trusted=True)
    assert (scratch / "sim.tmp").read_bytes() == b"partial"
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700, "a missing parent is created with its recorded mode"
    assert stat.S_IMODE((tmp_path / "local").stat().st_mode) == 0o751
    with pytest.raises(DamagedCheckpointError):  # unsigned: only the working directory
        restore_files(chunks, pool, entries, roots=[str(tree)], trusted=False)


def test_never_through_a_link_planted_above_the_working_directory(chunks, pool, tmp_path):
    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    (work / "state.db").write_bytes(b"state v1")
    entries = entries_of(chunks, pool, work)
    victim = tmp_path / "victim"
    victim.mkdir()
    import shutil

    shutil.rmtree(tmp_path / "parent")
    (tmp_path / "parent").symlink_to(victim)  # a directory above the job's, swapped for a link
    with pytest.raises(PermissionDenied, match="symbolic link"):
        restore_files(chunks, pool, entries, roots=[str(work)])
    assert os.listdir(victim) == []


def test_never_through_a_link_the_checkpoint_records_as_a_link(chunks, pool, tree, tmp_path):
    """A manifest with a link `work/etc -> /etc` and a file `work/etc/x`: the file would land in /etc."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (tree / "etc").symlink_to(victim)
    entries = entries_of(chunks, pool, tree)
    data = next(e for e in entries if e.path.endswith("state.db"))
    through = FileEntry(path=str(tree / "etc" / "x"), kind="file", mode=0o644, uid=0, gid=0, mtime_ns=0,
                        size=data.size, chunks=data.chunks)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        restore_files(chunks, pool, entries + [through], roots=[str(tree)])
    assert os.listdir(victim) == []


@pytest.mark.parametrize("path", ["relative/x", "/a/../b", "/a//b", "/a/./b"])
def test_paths_that_are_not_absolute_and_normal_are_damage(chunks, pool, tree, path):
    e = FileEntry(path=path, kind="dir", mode=0o755, uid=0, gid=0, mtime_ns=0)
    with pytest.raises(DamagedCheckpointError, match="absolute and normal"):
        restore_files(chunks, pool, [e], roots=["/"])


# --- the signing key --------------------------------------------------------------------------------------------
def _can_read_as_nobody(path: Path) -> bool:
    res = subprocess.run(["/usr/bin/python3", "-c", f"open({str(path)!r}).read()"],
                         preexec_fn=lambda: os.setuid(65534), capture_output=True, timeout=30)
    return res.returncode == 0


@pytest.fixture
def public_tmp():
    """A directory every user may traverse (pytest's own tmp_path is under a 0700 directory)."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("creates a root-only key and acts as another user")
    d = tempfile.mkdtemp(prefix="ckpt-key-test-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_creating_the_key_keeps_the_configuration_readable_by_users(public_tmp):
    """Issue 10: an agent creating its key made /etc/ckpt-agent 0700 and every user's `ckpt run` exited 78."""
    tmp_path = public_tmp
    etc = tmp_path / "etc-ckpt-agent"
    key = etc / "node.key"
    signer = Signer.ensure(str(key))  # the directory does not exist yet
    config = etc / "agent.yaml"
    config.write_text("{}\n")
    os.chmod(config, 0o644)
    assert signer.key and len(signer.key) == 64
    assert stat.S_IMODE(etc.stat().st_mode) == 0o755
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert _can_read_as_nobody(config) and not _can_read_as_nobody(key)
    assert Signer.ensure(str(key)).key == signer.key, "created once, then reused"

    os.chmod(etc, 0o700)  # what the earlier version left behind: repaired when the config lives there
    Signer.ensure(str(key), str(config))
    assert _can_read_as_nobody(config) and not _can_read_as_nobody(key)


def test_users_ckpt_commands_read_the_config_next_to_a_created_key(public_tmp):
    tmp_path = public_tmp
    etc = tmp_path / "etc"
    key = etc / "node.key"
    config = etc / "agent.yaml"
    etc.mkdir(mode=0o700)  # broken by an earlier version
    store = tmp_path / "store"
    store.mkdir(mode=0o777)
    config.write_text(json.dumps({"store": str(store), "agent": {"key_file": str(key)}}) + "\n")
    os.chmod(config, 0o644)
    Signer.ensure(str(key), str(config))
    from ckpt_dev import shared_venv

    try:
        bin_dir = shared_venv.refresh()  # the copy of this package every user can run
    except FileNotFoundError as e:
        pytest.skip(str(e))
    env = {"PATH": "/usr/bin:/bin", "CKPT_CONFIG": str(config)}
    res = subprocess.run([f"{bin_dir}/ckpt", "list"], env=env, capture_output=True, text=True,
                         preexec_fn=lambda: os.setuid(65534), timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr


# --- end to end with CRIU: root's job, an edited manifest -------------------------------------------------------
def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.criu
@pytest.mark.parametrize("tamper", ["edit", "drop-signature"])
def test_root_restore_of_an_edited_manifest_escapes_nothing_and_falls_back(ck, tmp_path, tamper):
    env, store, runtime = ck
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "victim.txt").write_text("precious")
    argv = ["python3", str(DATA / "runner" / "appender.py"), "120", "0.05"]
    job = "301"
    proc = start_ckpt("run", "--job-id", job, "--interval", "100000", "--", *argv, env=env, cwd=work,
                      out=tmp_path / "o", err=tmp_path / "e")
    try:
        wait_for(lambda: registered(runtime, job), 60, "the wrapper to register")
        wait_for(lambda: _lines(work / "log.txt") >= 5, 60, "the tool's first lines")
        assert run_ckpt("checkpoint", "--job-id", job, env=env).returncode == 0
        n = _lines(work / "log.txt")
        wait_for(lambda: _lines(work / "log.txt") >= n + 5, 60, "more lines")
        assert run_ckpt("checkpoint", "--job-id", job, "--final", env=env).returncode == 0
        assert proc.wait(timeout=60) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    key = tmp_path / "store" / ".." / "secret" / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, "root's job got a key at first use"
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o755
    manifests = sorted((store / job / "main").glob("gen-*/manifest.json"))
    assert len(manifests) == 2
    envelope = json.loads(manifests[-1].read_text())
    assert len(envelope["signature"]) == 64
    m = envelope["manifest"]
    data = next(f for f in m["files"] if f["kind"] == "file")
    m["files"] += [
        dict(data, path=str(tmp_path / "outside" / "evil.sh"), mode=0o755),
        {"path": str(tmp_path / "outside" / "shadow"), "kind": "symlink", "mode": 0o777, "uid": 0, "gid": 0,
         "mtime_ns": 0, "target": "/etc/shadow"},
        {"path": str(tmp_path / "victim.txt"), "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
    ]
    if tamper == "drop-signature":
        envelope.pop("signature")
    manifests[-1].write_text(json.dumps(envelope))

    bad = run_ckpt("verify", "--job-id", job, env=env)
    assert bad.returncode == 65, bad.stderr
    assert ("does not match" if tamper == "edit" else "not signed") in bad.stderr

    res = run_ckpt("run", "--job-id", job, "--", *argv, env=env, cwd=work, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checkpoint 2 is damaged" in res.stderr and "from checkpoint 1 taken" in res.stderr
    assert not (tmp_path / "outside").exists()
    assert (tmp_path / "victim.txt").read_text() == "precious"
    assert (work / "log.txt").read_text().splitlines() == [f"step {i}" for i in range(120)]
