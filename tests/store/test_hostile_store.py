"""Hostile store entries are never followed (issue 11, defect 5): every read opens a regular file only, without
following links and within a bound, so a chunk swapped for a FIFO cannot hang `ckpt verify`, one swapped for
/dev/zero cannot exhaust memory, a linked job, step or chunks directory is refused, and a malformed manifest is a
damaged generation with fallback, never exit 70."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from ckpt_helpers import ckpt_env, run_ckpt

from ckpt_agent.adapters.criu import Criu
from ckpt_agent.checkpoint.engine import Engine
from ckpt_agent.errors import DamagedCheckpointError
from ckpt_agent.node.config import CheckpointSettings
from ckpt_agent.store.chunks import ChunkStore
from ckpt_agent.store.generations import CheckpointStore, Signer
from ckpt_agent.store.layout import SUMMARY
from ckpt_agent.store.manifest import parse

JOB, STEP = "5150", "main"
TIMEOUT = 60  # a safety net: a hang would otherwise stall the suite


@pytest.fixture
def env(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    return ckpt_env(store, tmp_path / "run")


@pytest.fixture
def store(env):
    """The store as root's `ckpt run` has it: signing with the key of the environment's config."""
    key = json.loads(Path(env["CKPT_CONFIG"]).read_text())["agent"]["key_file"]
    s = CheckpointStore(env["CKPT_STORE"], Signer.from_file(key))
    s.ensure_job(JOB, STEP)
    return s


def commit(store, data=b"some image bytes " * 1000, **extra):
    chunks = ChunkStore(store.chunk_dir(JOB), compression="none")
    ref, _ = chunks.put(data)
    number, partial = store.begin(JOB, STEP)
    manifest = {"format": 1, "generation": number, "created": f"2026-12-01T00:00:0{number}.000000Z",
                "cwd": "/nonexistent", "images": [{"name": "pages-1.img", "size": ref.size,
                                                   "chunks": [ref.to_json()]}], "files": []}
    manifest.update(extra)
    return store.commit(partial, number, parse(manifest, "test")), chunks.path(ref)


def verify(env):
    return run_ckpt("verify", "--job-id", JOB, env=env, timeout=TIMEOUT)


def one_line(res):
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: "), res.stderr
    return lines[0]


def test_an_intact_checkpoint_verifies(env, store):
    commit(store)
    res = verify(env)
    assert res.returncode == 0, res.stderr


def _fifo(path):
    os.unlink(path)
    os.mkfifo(path)


def _zero_link(path):
    os.unlink(path)
    os.symlink("/dev/zero", path)


def _zero_device(path):
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.unlink(path)
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))


def _huge(path):
    with open(path, "r+b") as fh:
        fh.truncate(1 << 34)  # 16 GiB, sparse


@pytest.mark.parametrize("swap", [_fifo, _zero_link, _zero_device, _huge],
                         ids=["fifo", "symlink-to-dev-zero", "dev-zero-device", "16GiB-sparse-file"])
def test_a_chunk_swapped_for_a_special_file_is_damage_not_a_hang(env, store, swap):
    _, chunk = commit(store)
    swap(chunk)
    res = verify(env)
    assert res.returncode == 65
    assert "chunk" in one_line(res)


@pytest.mark.parametrize("swap", [_fifo, _zero_link], ids=["fifo", "symlink-to-dev-zero"])
def test_a_manifest_swapped_for_a_special_file_is_damage(env, store, swap):
    gen, _ = commit(store)
    swap(gen.manifest_path)
    res = verify(env)
    assert res.returncode == 65
    assert "manifest" in one_line(res)


def _elsewhere(tmp_path, src):
    """A copy of a store directory outside the store, for a planted link to point at."""
    dst = tmp_path / "elsewhere"
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("which", ["job", "step", "chunks"])
def test_a_linked_job_step_or_chunks_directory_is_refused(env, store, tmp_path, which):
    commit(store)
    target = {"job": store.job_dir(JOB), "step": store.step_dir(JOB, STEP), "chunks": store.chunk_dir(JOB)}[which]
    copy = _elsewhere(tmp_path, target)
    shutil.rmtree(target)
    os.symlink(copy, target)
    res = verify(env)
    assert res.returncode == 74, res.stderr
    assert "symbolic link" in one_line(res)
    listing = run_ckpt("list", "--json", env=env, timeout=TIMEOUT)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    if which in ("job", "step"):
        assert rows == [], "nothing is listed through a link"
        one = run_ckpt("list", "--job-id", JOB, env=env, timeout=TIMEOUT)
        assert one.returncode in (66, 74) and "Traceback" not in one.stderr


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("images"),
    lambda m: m.pop("files"),
    lambda m: m.update(images="not a list"),
    lambda m: m.update(images=[{"name": "../../etc/x", "size": 1, "chunks": []}]),
    lambda m: m["images"][0].update(chunks=[["../../../../etc/shadow", 10, "r"]]),
    lambda m: m["images"][0].update(chunks=[[m["images"][0]["chunks"][0][0], 1 << 40, "r"]]),
    lambda m: m.update(files=[{"path": "/x", "kind": "file"}]),
    lambda m: m.update(created=None),
], ids=["no-images", "no-files", "images-not-a-list", "image-name-with-path", "digest-with-path",
        "chunk-size-beyond-bound", "file-entry-without-fields", "no-created"])
def test_a_malformed_manifest_is_a_damaged_generation_with_fallback(env, store, edit):
    commit(store)
    newest, _ = commit(store, data=b"newer image " * 1000)
    with open(newest.manifest_path) as fh:
        envelope = json.load(fh)
    edit(envelope["manifest"])
    # signed again, as a buggy writer would have signed it: the shape check, not the signature, must catch it
    body = json.dumps(envelope["manifest"], sort_keys=True, separators=(",", ":")).encode()
    envelope["signature"] = store.signer.sign(body)
    with open(newest.manifest_path, "w") as fh:
        json.dump(envelope, fh)
    res = verify(env)
    assert res.returncode == 65
    assert "malformed manifest" in one_line(res) or "unreadable" in one_line(res)

    # restore passes over it to the older generation (CRIU is not reached: both are damaged for the engine
    # once the older one's image is gone, and the error lists both, never a KeyError)
    shutil.rmtree(store.chunk_dir(JOB))
    os.mkdir(store.chunk_dir(JOB), 0o700)
    engine = Engine(Criu("/bin/false"), store, CheckpointSettings())
    with pytest.raises(DamagedCheckpointError) as exc:
        engine.restore(JOB, STEP, {})
    assert "#2:" in str(exc.value) and "#1:" in str(exc.value)


def test_list_reads_the_summary_not_the_manifest(env, store):
    gen, _ = commit(store, stats={"bytes_in": 4096, "bytes_written": 1024}, reason="periodic", node="node7")
    with open(os.path.join(gen.path, SUMMARY)) as fh:
        assert json.load(fh)["node"] == "node7"
    os.unlink(gen.manifest_path)  # the listing does not need it
    with open(gen.manifest_path, "w") as fh:
        fh.write("{}")
    res = run_ckpt("list", "--json", env=env, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert row["generations"] == [{"generation": 1, "created": "2026-12-01T00:00:01.000000Z", "final": False,
                                   "reason": "periodic", "bytes": 4096, "bytes_written": 1024, "node": "node7"}]


def test_list_falls_back_to_the_manifest_without_a_summary(env, store):
    gen, _ = commit(store, stats={"bytes_in": 4096, "bytes_written": 1024}, node="node7")
    os.unlink(os.path.join(gen.path, SUMMARY))  # a generation written before summaries existed
    res = run_ckpt("list", "--json", env=env, timeout=TIMEOUT)
    (row,) = json.loads(res.stdout)
    assert row["generations"][0]["node"] == "node7" and row["generations"][0]["bytes"] == 4096
    with open(os.path.join(gen.path, SUMMARY), "w") as fh:  # a summary a user scribbled on: the manifest is used
        json.dump({"generation": "x"}, fh)
    res = run_ckpt("list", env=env, timeout=TIMEOUT)
    assert res.returncode == 0 and "node7" in res.stdout, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs two users")
def test_list_in_a_shared_store_skips_jobs_the_caller_may_not_read(env, store):
    """Each job directory is 0700 and its user's: another user's `ckpt list` shows its own jobs, counts the rest."""
    from ckpt_dev import shared_venv

    commit(store)
    os.chmod(env["CKPT_STORE"], 0o1777)
    path = os.path.dirname(env["CKPT_STORE"])
    while path != "/":  # the test's directories must be traversable by the other user
        os.chmod(path, os.stat(path).st_mode | 0o055)
        path = os.path.dirname(path)
    mine = CheckpointStore(env["CKPT_STORE"])
    mine.ensure_job("6000", STEP, uid=65534, gid=65534)
    try:
        bin_dir = shared_venv.refresh()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import subprocess

    user_env = {"PATH": "/usr/bin:/bin", "CKPT_STORE": env["CKPT_STORE"], "CKPT_CONFIG": env["CKPT_CONFIG"]}
    for args in (["list"], ["list", "--json"]):
        res = subprocess.run([f"{bin_dir}/ckpt", *args], env=user_env, capture_output=True, text=True,
                             preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)), timeout=TIMEOUT, cwd="/")
        assert res.returncode == 0, res.stderr
        assert "skipped 1 job(s)" in one_line(res)
        assert JOB not in res.stdout
        if "--json" in args:
            assert [r["job_id"] for r in json.loads(res.stdout)] == ["6000"]


def test_a_linked_chunk_prefix_directory_is_damage(env, store, tmp_path):
    _, chunk = commit(store)
    prefix = os.path.dirname(chunk)
    copy = _elsewhere(tmp_path, prefix)
    shutil.rmtree(prefix)
    os.symlink(copy, prefix)
    res = verify(env)
    assert res.returncode == 65
    assert "symbolic link" in one_line(res)
