"""ckpt_agent.store.generations: generations appear only when committed, durably; pruning, chunk sweeping, signatures,
names that cannot escape the store, events and step results."""

from __future__ import annotations

import json
import os
import stat

import pytest
from ckpt_helpers import CallCounter, store_with_job

from ckpt_agent.errors import (
    EXIT_DAMAGED,
    DamagedCheckpointError,
    NewerFormatError,
    NotFoundError,
    PermissionDenied,
    StoreError,
    UsageError,
)
from ckpt_agent.store import chunks as chunkstore
from ckpt_agent.store import manifest as manifest_module
from ckpt_agent.store.generations import CheckpointStore, Signer
from ckpt_agent.store.layout import MANIFEST, check_name
from ckpt_agent.store.manifest import FORMAT_VERSION, parse

JOB, STEP = "4242", "main"


@pytest.fixture
def store(tmp_path):
    return store_with_job(tmp_path, JOB, STEP)


def manifest_with(refs=(), **extra):
    m = {"format": FORMAT_VERSION, "created": "2026-11-29T00:00:00.000000Z",
         "images": [{"name": "pages-1.img", "size": sum(r.size for r in refs), "chunks": [r.to_json() for r in refs]}],
         "files": []}
    m.update(extra)
    return parse(m, "test")


def commit_one(store, refs=(), **extra):
    number, partial = store.begin(JOB, STEP)
    return store.commit(partial, number, manifest_with(refs, **extra))


def test_partial_generation_is_never_listed(store):
    number, partial = store.begin(JOB, STEP)
    assert number == 1
    assert os.path.basename(partial).startswith("gen-000001.partial-")
    with open(os.path.join(partial, MANIFEST), "w") as fh:  # even a partial with a manifest inside
        json.dump({"manifest": manifest_with().to_json()}, fh)
    assert store.generations(JOB, STEP) == []
    with pytest.raises(NotFoundError):
        store.latest_generation(JOB, STEP)
    assert store.partials(JOB, STEP) == [partial]


def test_generation_directory_without_manifest_is_not_listed(store):
    os.mkdir(os.path.join(store.step_dir(JOB, STEP), "gen-000007"))
    assert store.generations(JOB, STEP) == []


def test_commit_makes_the_generation_visible_with_its_manifest(store):
    gen = commit_one(store, reason="periodic")
    assert (gen.number, gen.job_id, gen.step) == (1, JOB, STEP)
    assert os.path.basename(gen.path) == "gen-000001"
    assert store.partials(JOB, STEP) == []
    assert [g.number for g in store.generations(JOB, STEP)] == [1]
    assert store.load_manifest(gen).reason == "periodic"


def test_commit_syncs_chunks_before_writing_the_manifest_and_fsyncs_it_before_the_rename(store, monkeypatch):
    calls = []
    real_fsync, real_rename = os.fsync, os.rename

    def fake_syncfs(path):
        calls.append(("syncfs", path))

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        calls.append(("rename", os.path.basename(src), os.path.basename(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(chunkstore, "syncfs", fake_syncfs)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    number, partial = store.begin(JOB, STEP)
    store.commit(partial, number, manifest_with())
    monkeypatch.undo()

    kinds = [c[0] for c in calls]
    assert calls[0] == ("syncfs", store.job_dir(JOB)), "chunks must be durable before the manifest exists"
    manifest_fsync = next(i for i, c in enumerate(calls) if c[0] == "fsync" and ".tmp-" in c[1])
    manifest_rename = next(i for i, c in enumerate(calls) if c[0] == "rename" and c[2] == MANIFEST)
    gen_rename = next(i for i, c in enumerate(calls) if c[0] == "rename" and c[2] == "gen-000001")
    assert manifest_fsync < manifest_rename < gen_rename
    step_fsync = [i for i, c in enumerate(calls) if c == ("fsync", store.step_dir(JOB, STEP))]
    assert step_fsync and step_fsync[-1] > gen_rename, "the rename itself must be made durable"
    assert kinds.count("syncfs") == 1


def test_generation_numbers_continue_past_partials(store):
    n1, p1 = store.begin(JOB, STEP)  # a checkpointer killed midway leaves this behind
    n2, p2 = store.begin(JOB, STEP)
    assert (n1, n2) == (1, 2)
    store.commit(p2, n2, manifest_with())
    n3, p3 = store.begin(JOB, STEP)
    assert n3 == 3
    store.abort(p3)
    assert not os.path.exists(p3)
    assert os.path.exists(p1)
    assert [g.number for g in store.generations(JOB, STEP)] == [2]


def test_prune_keeps_the_newest(store):
    for _ in range(4):
        commit_one(store)
    assert store.prune(JOB, STEP, keep=2) == [1, 2]
    assert [g.number for g in store.generations(JOB, STEP)] == [3, 4]
    assert store.prune(JOB, STEP, keep=2) == []
    assert store.prune(JOB, STEP, keep=0) == [3, 4]
    assert store.generations(JOB, STEP) == []


def test_sweep_removes_only_unreferenced_chunks(store):
    chunks = store.chunks_for(JOB)
    kept, _ = chunks.put(b"referenced " * 1000)
    dropped, _ = chunks.put(b"orphan " * 1000)
    leftover_tmp = chunks.path(kept) + ".tmp-1-2"
    with open(leftover_tmp, "wb") as fh:
        fh.write(b"half a chunk")
    commit_one(store, [kept])
    expected_freed = os.path.getsize(chunks.path(dropped)) + os.path.getsize(leftover_tmp)
    removed, freed = store.sweep_chunks(JOB)
    assert (removed, freed) == (2, expected_freed)
    assert os.path.exists(chunks.path(kept))
    assert not os.path.exists(chunks.path(dropped))
    assert not os.path.exists(leftover_tmp)
    assert store.chunks_for(JOB).get(kept) == b"referenced " * 1000


def test_a_manifest_a_newer_agent_wrote_keeps_its_chunks(store):
    """Unreadable here but not damaged (a rolling upgrade): the sweep after a checkpoint removes nothing while such
    a generation is there, and a restore passes over it as over a damaged one."""
    chunks = store.chunks_for(JOB)
    newer, _ = chunks.put(b"only the newer generation references this " * 100)
    orphan, _ = chunks.put(b"no generation references this " * 100)
    gen = commit_one(store, [newer])
    rewrite_manifest(gen, lambda env: env["manifest"].update(format=FORMAT_VERSION + 1))
    with pytest.raises(NewerFormatError, match=f"format {FORMAT_VERSION + 1} .*a newer agent wrote it"):
        store.load_manifest(gen)
    with pytest.raises(NewerFormatError):
        store.referenced_digests(JOB)
    with pytest.raises(NewerFormatError):
        store.sweep_chunks(JOB)
    assert os.path.exists(chunks.path(newer)) and os.path.exists(chunks.path(orphan))
    rewrite_manifest(gen, lambda env: env["manifest"].update(format=FORMAT_VERSION))
    assert store.sweep_chunks(JOB)[0] == 1 and not os.path.exists(chunks.path(orphan))


def test_sweep_keeps_chunks_of_every_step(store):
    store.ensure_job(JOB, "second")
    chunks = store.chunks_for(JOB)
    a, _ = chunks.put(b"step one " * 100)
    b, _ = chunks.put(b"step two " * 100)
    commit_one(store, [a])
    number, partial = store.begin(JOB, "second")
    store.commit(partial, number, manifest_with([b]))
    assert store.sweep_chunks(JOB) == (0, 0)
    assert os.path.exists(chunks.path(a)) and os.path.exists(chunks.path(b))


def test_sweep_skips_while_a_writer_holds_the_job_lock(store):
    chunks = store.chunks_for(JOB)
    fresh, _ = chunks.put(b"written by a checkpoint in flight " * 100)  # no manifest references it yet
    with store.job_lock(JOB) as locked:
        assert locked
        assert store.sweep_chunks(JOB) == (0, 0)
        assert os.path.exists(chunks.path(fresh))
    assert store.sweep_chunks(JOB)[0] == 1
    assert not os.path.exists(chunks.path(fresh))


def test_exclusive_lock_is_refused_while_shared_is_held(store):
    with store.job_lock(JOB) as shared:
        with store.job_lock(JOB) as second_shared:
            assert shared and second_shared
            with store.job_lock(JOB, exclusive=True, blocking=False) as exclusive:
                assert exclusive is False


def test_known_chunks_lists_only_chunks_that_exist(store):
    chunks = store.chunks_for(JOB)
    a, _ = chunks.put(b"a" * 5000)
    b, _ = chunks.put(b"b" * 5000)
    commit_one(store, [a, b])
    os.unlink(chunks.path(b))
    assert store.known_chunks(JOB) == {a.digest: a.codec}


def test_known_chunks_does_not_parse_again_a_manifest_the_caller_loaded(store, monkeypatch):
    chunks = store.chunks_for(JOB)
    a, _ = chunks.put(b"a" * 5000)
    b, _ = chunks.put(b"b" * 5000)
    first = commit_one(store, [a], step=STEP, generation=1)
    second = commit_one(store, [b], step=STEP, generation=2)
    store.load_manifest(second)  # the engine's previous manifest
    parsed = []
    real_decode = manifest_module.decode
    monkeypatch.setattr(manifest_module, "decode", lambda raw, where, *a, **kw: parsed.append(where) or
                        real_decode(raw, where, *a, **kw))
    assert store.known_chunks(JOB) == {a.digest: a.codec, b.digest: b.codec}
    assert parsed == [first.manifest_path]
    parsed.clear()
    os.utime(first.manifest_path)  # changed since it was read: parsed again, and only it
    assert store.known_chunks(JOB) == {a.digest: a.codec, b.digest: b.codec}
    assert parsed == [first.manifest_path]


def test_known_chunks_lists_directories_and_stats_no_chunk(store, monkeypatch):
    """On Lustre a stat of each chunk also asks the object servers: known_chunks lists the prefix directories
    instead. A chunk under another codec's name is not the one referenced; a prefix directory replaced by a link is
    not entered."""
    chunks = store.chunks_for(JOB)
    refs = [chunks.put(bytes([i]) * 5000)[0] for i in range(40)]
    commit_one(store, refs)
    gone, renamed, linked = refs[0], refs[1], refs[2]
    os.unlink(chunks.path(gone))
    os.rename(chunks.path(renamed), chunks.path(renamed) + ".zst")
    prefix_dir = os.path.dirname(chunks.path(linked))
    moved = prefix_dir + ".elsewhere"
    os.rename(prefix_dir, moved)
    os.symlink(moved, prefix_dir)
    in_linked_dir = {r.digest for r in refs if r.digest[:2] == linked.digest[:2]}
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **kw: stats.append(path) or real_stat(path, *a, **kw))
    known = store.known_chunks(JOB)
    monkeypatch.undo()
    assert not [p for p in stats if any(r.digest in str(p) for r in refs)], stats
    assert set(known) == {r.digest for r in refs} - {gone.digest, renamed.digest} - in_linked_dir


# --- signatures ---------------------------------------------------------------------------------------------------
@pytest.fixture
def signed(tmp_path):
    root = tmp_path / "signed"
    root.mkdir()
    s = CheckpointStore(str(root), Signer(b"node key 1"))
    s.ensure_job(JOB, STEP)
    return s


def rewrite_manifest(gen, edit):
    with open(gen.manifest_path) as fh:
        envelope = json.load(fh)
    edit(envelope)
    with open(gen.manifest_path, "w") as fh:
        json.dump(envelope, fh)


def test_signed_manifest_verifies(signed):
    gen = commit_one(signed)
    with open(gen.manifest_path) as fh:
        assert len(json.load(fh)["signature"]) == 64
    assert signed.load_manifest(gen, require_signature=True).format == FORMAT_VERSION


def test_manifest_edited_after_signing_is_a_damaged_generation(signed):
    gen = commit_one(signed, uid=1000)
    rewrite_manifest(gen, lambda env: env["manifest"].update(uid=0))
    with pytest.raises(DamagedCheckpointError, match="altered or forged") as exc:
        signed.load_manifest(gen)
    assert exc.value.exit_code == EXIT_DAMAGED


def test_manifest_signed_with_another_key_is_refused(signed):
    gen = commit_one(signed)
    other = CheckpointStore(signed.root, Signer(b"another node's key"))
    with pytest.raises(DamagedCheckpointError):
        other.load_manifest(gen)


def test_unsigned_manifest_is_damaged_whenever_a_key_exists(store):
    gen = commit_one(store)
    keyed = CheckpointStore(store.root, Signer(b"node key 1"))
    for required in (True, False):  # a key exists: every manifest must be signed
        with pytest.raises(DamagedCheckpointError, match="not signed"):
            keyed.load_manifest(gen, require_signature=required)
    assert store.load_manifest(gen).format == FORMAT_VERSION  # no key (a user's `ckpt list`): cannot check
    with pytest.raises(PermissionDenied, match="no signing key"):
        store.load_manifest(gen, require_signature=True)


def test_signature_removed_from_a_signed_manifest_is_damage(signed):
    gen = commit_one(signed)
    rewrite_manifest(gen, lambda env: env.pop("signature"))
    with pytest.raises(DamagedCheckpointError, match="not signed"):
        signed.load_manifest(gen)


def test_signer_from_missing_or_empty_key_file_has_no_key(tmp_path):
    assert Signer.from_file(str(tmp_path / "none")).key is None
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert Signer.from_file(str(empty)).key is None
    keyfile = tmp_path / "key"
    keyfile.write_text("secret\n")
    assert Signer.from_file(str(keyfile)).key == b"secret"


def _decodes(monkeypatch) -> CallCounter:
    """Counts the manifests decoded (read and checked) by the store."""
    return CallCounter(monkeypatch, manifest_module, "decode")


def test_a_manifest_that_stats_as_when_it_was_read_is_not_decoded_again(store, monkeypatch):
    gen = commit_one(store)
    decodes = _decodes(monkeypatch)
    first = store.load_manifest(gen)
    assert store.load_manifest(gen) is first and store.referenced_digests(JOB) == set() and decodes.n == 1
    os.utime(gen.manifest_path)  # any change to the file (here its times; a write changes its ctime too)
    assert store.load_manifest(gen) == first and decodes.n == 2
    rewrite_manifest(gen, lambda env: env["manifest"].update(reason="edited"))
    assert store.load_manifest(gen).reason == "edited" and decodes.n == 3


def test_a_cached_manifest_read_without_a_signature_check_is_checked_when_one_is_required(store, monkeypatch):
    gen = commit_one(store)
    decodes = _decodes(monkeypatch)
    store.load_manifest(gen)
    with pytest.raises(PermissionDenied):  # no key: cannot check, so refused where a signature is required
        store.load_manifest(gen, require_signature=True)
    assert decodes.n == 2


def test_the_manifest_cache_keeps_the_manifests_read_last_within_its_bound(store, monkeypatch):
    gens = [commit_one(store) for _ in range(3)]
    size = os.path.getsize(gens[0].manifest_path)
    store.manifests.max_bytes = 2 * size + size // 2  # two of them
    decodes = _decodes(monkeypatch)
    for gen in gens:
        store.load_manifest(gen)
    store.load_manifest(gens[2])
    store.load_manifest(gens[1])
    assert decodes.n == 3
    store.load_manifest(gens[0])  # the first was let go
    assert decodes.n == 4
    assert sorted(store.manifests._entries) == [gens[0].manifest_path, gens[1].manifest_path]
    assert store.prune(JOB, STEP, keep=1) == [1, 2]
    assert not store.manifests._entries, "pruned generations are let go"


@pytest.mark.parametrize("content, words", [("{not json", "unreadable"), ('{"other": 1}', "unreadable"),
                                            ('{"manifest": {"format": 99}}', "unsupported manifest format")])
def test_unreadable_manifest_is_damaged(store, content, words):
    gen = commit_one(store)
    with open(gen.manifest_path, "w") as fh:
        fh.write(content)
    with pytest.raises(DamagedCheckpointError, match=words):
        store.load_manifest(gen)


# --- names and layout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", ".", "..", "../etc", "a/b", "/abs", "-rf", ".hidden", "a b", "x" * 129,
                                 "job\n1",
                                 "42\n"])
def test_check_name_refuses_names_that_could_escape_the_store(bad):
    with pytest.raises(UsageError) as exc:  # a bad name is a usage error (exit 2), not a store failure
        check_name("job id", bad)
    assert exc.value.exit_code == 2


@pytest.mark.parametrize("good", ["42", "1234_7", "main", "step-2.b", "a+b", "x" * 128])
def test_check_name_accepts_job_ids_and_step_names(good):
    assert check_name("step name", good) == good


def test_store_paths_refuse_escaping_names(store):
    with pytest.raises(UsageError):
        store.job_dir("..")
    with pytest.raises(UsageError):
        store.step_dir(JOB, "../../x")


def test_job_directories_are_private(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    old = os.umask(0)
    try:
        s = CheckpointStore(str(root))
        os.makedirs(root / "77", mode=0o755)  # created earlier, too open
        s.ensure_job("77", STEP)
    finally:
        os.umask(old)
    for path in (root / "77", root / "77" / STEP, root / "77" / "chunks"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_ensure_job_refuses_a_symlinked_job_dir(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "88").symlink_to(elsewhere)
    with pytest.raises(StoreError, match="symbolic link"):
        CheckpointStore(str(root)).ensure_job("88", STEP)


def test_ensure_job_without_store_root_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        CheckpointStore(str(tmp_path / "missing")).ensure_job(JOB, STEP)


def test_jobs_and_steps_listing(store):
    store.ensure_job("4243", "other")
    assert store.jobs() == [JOB, "4243"]
    assert store.steps(JOB) == [STEP]
    assert store.steps("4243") == ["other"]
    assert store.steps("9999") == []


# --- events and results -------------------------------------------------------------------------------------------
def test_events_append_and_read_back_skipping_damaged_lines(store):
    store.append_event(JOB, {"event": "checkpoint_started", "generation": 1})
    with open(os.path.join(store.job_dir(JOB), "events.jsonl"), "a") as fh:
        fh.write('{"event": "torn\n')
    store.append_event(JOB, {"event": "checkpoint_committed", "generation": 1})
    assert [e["event"] for e in store.events(JOB)] == ["checkpoint_started", "checkpoint_committed"]
    assert store.events("nosuchjob") == []


def test_step_result_is_recorded(store):
    assert store.result(JOB, STEP) is None
    store.record_result(JOB, STEP, 3)
    result = store.result(JOB, STEP)
    assert result["exit_status"] == 3
    assert result["finished"].endswith("Z")
    assert stat.S_IMODE(os.stat(os.path.join(store.step_dir(JOB, STEP), "result.json")).st_mode) == 0o600


def test_unreadable_step_result_is_a_store_error(store):
    with open(os.path.join(store.step_dir(JOB, STEP), "result.json"), "w") as fh:
        fh.write("{")
    with pytest.raises(StoreError, match="unreadable step result"):
        store.result(JOB, STEP)
