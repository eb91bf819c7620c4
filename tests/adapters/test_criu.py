"""`criu`: version gate, the dump/restore options the product relies on, errors reported from CRIU's log,
and (with real CRIU) the pagemap parsing that makes memory chunks follow virtual addresses."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import pytest
from ckpt_helpers import criu_binary, require_criu, wait_for

from ckpt_agent.adapters import criu as criu_mod
from ckpt_agent.adapters.criu import Criu, pages_cut_points
from ckpt_agent.errors import EXIT_CRIU, CommandError, CriuError, IncompatibleCpuError
from ckpt_agent.store.chunks import CHUNK_BYTES, ChunkStore, store_file
from ckpt_agent.util.proc import Result


class FakeRun:
    """Stands in for proc.run: records argv and keyword arguments, answers with canned output or an error."""

    def __init__(self, stdout="Version: 4.2.1\n", fail=None, on_call=None):
        self.calls = []
        self.stdout = stdout
        self.fail = fail
        self.on_call = on_call

    def __call__(self, argv, **kw):
        self.calls.append((list(argv), kw))
        if self.on_call:
            self.on_call(argv)
        if self.fail and self.fail(argv):
            raise CommandError(argv, 1, "criu failed\n")
        return Result(list(argv), 0, self.stdout, "")


@pytest.mark.parametrize("out, version", [("Version: 4.2.1\n", "4.2.1"), ("Version: 4.3\nGitID: v4.3-12\n", "4.3"),
                                          ("Version: 5.0.0-rc1\n", "5.0.0-rc1")])
def test_version_is_parsed_and_accepted(out, version):
    c = Criu("/opt/criu", run=FakeRun(out))
    assert c.require_version() == version
    assert c.run.calls[0][0] == ["/opt/criu", "--version"]
    c.version()
    assert len(c.run.calls) == 1, "the version is asked once"


@pytest.mark.parametrize("out", ["Version: 4.2\n", "Version: 4.1.1\n", "Version: 3.17.1\n"])
def test_too_old_version_is_refused(out):
    with pytest.raises(CriuError) as exc:
        Criu("criu", run=FakeRun(out)).require_version()
    assert exc.value.exit_code == EXIT_CRIU == 69
    assert "need >= 4.2.1" in str(exc.value)
    assert "install-criu.sh" in str(exc.value)


@pytest.mark.parametrize("out, patched", [
    ("Version: 4.2.1\nPatches: ckpt-agent-0001-rlimits-from-proc\n", True),
    ("Version: 4.2.1\nGitID: v4.2.1\n", False),
    ("Version: 4.2.1\nPatches: ckpt-agent-0002-something-else\n", False),
])
def test_patches_are_read_from_the_version_line(out, patched, monkeypatch):
    c = Criu("criu", run=FakeRun(out))
    assert (criu_mod.RLIMITS_PATCH in c.patches()) is patched
    monkeypatch.setattr(criu_mod, "root_has_cap_sys_resource", lambda: False)
    assert c.can_dump_other_users() is patched
    monkeypatch.setattr(criu_mod, "root_has_cap_sys_resource", lambda: True)
    assert c.can_dump_other_users() is True, "with the capability, any CRIU >= 4.2.1 dumps other users' jobs"
    assert len(c.run.calls) == 1, "criu --version is run once"


def test_installed_criu_can_dump_other_users_here():
    """install-criu.sh builds with the patches, so this machine (root lacks CAP_SYS_RESOURCE) dumps users' jobs."""
    require_criu()
    assert Criu(criu_binary()).can_dump_other_users()


def test_root_dumps_and_restores_another_users_process(tmp_path):
    """The capability patch 0001 stands in for, for real: root dumps a tree owned by 'nobody' (prlimit() of it is
    refused here) and restores it with its limits."""
    require_criu()
    images = tmp_path / "img"
    images.mkdir()
    tool = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                             "setsid", "sh", "-c", "ulimit -S -n 321; exec sleep 600"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Max open files            321" in _limits(tool.pid), 30, "the tool's limits")
        Criu(criu_binary()).dump(tool.pid, str(images), leave_stopped=False)  # the tree is killed after the dump
        tool.wait(timeout=30)
        restored = subprocess.run([criu_binary(), "restore", "-d", "-D", str(images), "--cpu-cap=fpu,ins",
                                   "--tcp-close", "--pidfile", str(images / "pid"), "-o", "restore.log"],
                                  capture_output=True, timeout=60)
        assert restored.returncode == 0, (images / "restore.log").read_text()[-2000:]
        pid = int((images / "pid").read_text())
        try:
            assert "Max open files            321" in _limits(pid)
            assert os.stat(f"/proc/{pid}").st_uid != 0
        finally:
            os.kill(pid, signal.SIGKILL)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


def _limits(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/limits") as fh:
            return fh.read()
    except OSError:
        return ""


def test_unparseable_version_is_a_criu_error():
    with pytest.raises(CriuError, match="cannot tell the version"):
        Criu("criu", run=FakeRun("criu: something else\n")).version()


def test_missing_binary_is_a_criu_error(tmp_path):
    with pytest.raises(CriuError) as exc:
        Criu(str(tmp_path / "no-criu")).version()  # the real proc.run
    assert exc.value.exit_code == 69
    assert "command not found" in str(exc.value)


def test_dump_passes_the_documented_options(tmp_path):
    run = FakeRun()
    Criu("criu", run=run).dump(1234, str(tmp_path), ghost_limit="2G", timeout=30)
    argv, kw = run.calls[0]
    assert argv[:2] == ["criu", "dump"]
    assert argv[argv.index("-t") + 1] == "1234"
    assert argv[argv.index("-D") + 1] == str(tmp_path)
    for opt in ("--leave-stopped", "--manage-cgroups=ignore", "--tcp-close", "--cpu-cap=fpu,ins", "--ext-unix-sk"):
        assert opt in argv, opt
    assert argv[argv.index("--ghost-limit") + 1] == "2G"
    assert argv[argv.index("-o") + 1] == "dump.log"
    assert "--leave-running" not in argv and "--shell-job" not in argv and "--track-mem" not in argv
    assert kw["timeout"] == 30


def test_dump_options_can_be_turned_off(tmp_path):
    run = FakeRun()
    Criu("criu", run=run).dump(1, str(tmp_path), leave_stopped=False, tcp_close=False)
    argv = run.calls[0][0]
    assert "--leave-stopped" not in argv and "--tcp-close" not in argv
    assert argv[argv.index("--ghost-limit") + 1] == "1G"


def test_restore_is_detached_as_sibling_with_inherited_pipes(tmp_path):
    pidfile = tmp_path / "restored.pid"

    def write_pid(argv):
        pidfile.write_text("4321\n")

    run = FakeRun(on_call=write_pid)
    pid = Criu("criu", run=run).restore(str(tmp_path), pidfile=str(pidfile), inherit_fds={7: "pipe:[111]",
                                                                                          5: "pipe:[222]"})
    assert pid == 4321
    argv, kw = run.calls[0]
    assert argv[:2] == ["criu", "restore"]
    assert "-d" in argv and "-S" in argv
    assert argv[argv.index("--pidfile") + 1] == str(pidfile)
    for opt in ("--manage-cgroups=ignore", "--tcp-close", "--cpu-cap=fpu,ins"):
        assert opt in argv, opt
    inherited = [argv[i + 1] for i, a in enumerate(argv) if a == "--inherit-fd"]
    assert inherited == ["fd[5]:pipe:[222]", "fd[7]:pipe:[111]"]
    assert sorted(kw["pass_fds"]) == [5, 7], "the new pipe ends must reach CRIU"


def test_restore_not_as_sibling_drops_only_dash_s(tmp_path):
    pidfile = tmp_path / "restored.pid"
    run = FakeRun(on_call=lambda argv: pidfile.write_text("7"))
    Criu("criu", run=run).restore(str(tmp_path), pidfile=str(pidfile), sibling=False)
    argv = run.calls[0][0]
    assert "-S" not in argv and "-d" in argv and "--pidfile" in argv


def test_restore_without_pidfile_is_a_criu_error(tmp_path):
    with pytest.raises(CriuError, match="wrote no pid"):
        Criu("criu", run=FakeRun()).restore(str(tmp_path), pidfile=str(tmp_path / "restored.pid"))


CRIU_LOG = """\
(00.000011) Version: 4.2.1 (gitid 0)
(00.001000) Warn  (criu/kerndat.c:1): rlimit: Can't setup RLIMIT_NOFILE for self
(00.012345) Error (criu/files-reg.c:2175): File tmp/job.w has bad size 36 (expect 30)
(00.012400) Error (criu/cr-restore.c:1230): Restoring FAILED.
"""


@pytest.mark.parametrize("op", ["dump", "restore"])
def test_failure_reports_the_first_error_line_of_the_log(tmp_path, op, monkeypatch):
    monkeypatch.setattr(criu_mod, "FAILED_LOG_DIR", str(tmp_path / "failed"))
    (tmp_path / f"{op}.log").write_text(CRIU_LOG)
    c = Criu("criu", run=FakeRun(fail=lambda argv: True))
    with pytest.raises(CriuError) as exc:
        if op == "dump":
            c.dump(99, str(tmp_path))
        else:
            c.restore(str(tmp_path), pidfile=str(tmp_path / "p"))
    message = str(exc.value)
    assert exc.value.exit_code == 69
    assert message.startswith(f"criu {op} failed: Error (criu/files-reg.c:2175): File tmp/job.w has bad size")
    assert "Restoring FAILED" not in message and "00.012345" not in message
    kept = message.rsplit("(log: ", 1)[1].rstrip(")")
    assert open(kept).read() == CRIU_LOG, "the log outlives the discarded images, named in the message"


def test_failure_without_a_log_reports_the_command_error(tmp_path, monkeypatch):
    monkeypatch.setattr(criu_mod, "FAILED_LOG_DIR", str(tmp_path / "failed"))
    with pytest.raises(CriuError, match="criu dump failed: criu exited with 1: criu failed"):
        Criu("criu", run=FakeRun(fail=lambda argv: True)).dump(99, str(tmp_path))


@pytest.mark.parametrize("first_error, refused", [
    ("Error (criu/arch/x86/cpu.c:274): CPU xsave size mismatch (2696/2440)", True),
    ("Error (criu/arch/aarch64/cpu.c:30): CPU feature mismatch", True),
    ("Error (criu/cpu.c:1): cpu: avx512f is missing", True),
    ("Error (criu/files-reg.c:2175): File tmp/job.w has bad size", False),
    ("Error (criu/cr-restore.c:1): cpu.c:12 mentioned elsewhere", False),
])
def test_a_restore_refused_by_the_cpu_check_is_told_apart(tmp_path, monkeypatch, first_error, refused):
    """`criu restore` checks the CPU first (there is no `criu cpuinfo check` of our own): its first error from
    cpu.c is an IncompatibleCpuError (its own kind within exit code 69: the job is requeued to a compatible node),
    any other a CriuError; both name the error and the kept log."""
    monkeypatch.setattr(criu_mod, "FAILED_LOG_DIR", str(tmp_path / "failed"))
    (tmp_path / "restore.log").write_text(f"(00.001) Version: 4.2.1\n(00.012345) {first_error}\n"
                                          "(00.02) Error (criu/cr-restore.c:2400): Restoring FAILED.\n")
    run = FakeRun(fail=lambda argv: True)
    with pytest.raises(CriuError) as exc:
        Criu("criu", run=run).restore(str(tmp_path), pidfile=str(tmp_path / "pid"))
    assert isinstance(exc.value, IncompatibleCpuError) == refused
    assert exc.value.exit_code == EXIT_CRIU
    assert first_error in str(exc.value) and "(log: " in str(exc.value)
    assert ("same instance family" in str(exc.value)) == refused
    assert [argv[:2] for argv, _ in run.calls] == [["criu", "restore"]]


def test_a_dump_failing_in_the_cpu_code_is_no_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(criu_mod, "FAILED_LOG_DIR", str(tmp_path / "failed"))
    (tmp_path / "dump.log").write_text("(00.01) Error (criu/arch/x86/cpu.c:99): cpuid failed\n")
    with pytest.raises(CriuError) as exc:
        Criu("criu", run=FakeRun(fail=lambda argv: True)).dump(99, str(tmp_path))
    assert not isinstance(exc.value, IncompatibleCpuError)


def _xsave_size_changed(image: bytes) -> bytes:
    """cpuinfo.img (two magics, the entry's size, a cpuinfo_entry) with its x86 entry's xsave_size (field 9) changed
    in place, its varint's length kept: what CRIU reads as an image from a CPU with another xsave area."""
    buf = bytearray(image)
    assert buf[12] == 0x0A, "a cpuinfo_entry whose first field is its x86 entry"
    length, pos = criu_mod.read_varint(buf, 13)
    end = pos + length
    while pos < end:
        key, pos = criu_mod.read_varint(buf, pos)
        if key == (9 << 3):
            buf[pos] ^= 0x08  # the varint's low bits: the size differs by 8 bytes
            return bytes(buf)
        if key & 7 == 0:
            _, pos = criu_mod.read_varint(buf, pos)
        elif key & 7 == 2:
            n, pos = criu_mod.read_varint(buf, pos)
            pos += n
        else:
            raise AssertionError(f"field type {key & 7} in cpuinfo.img")
    raise AssertionError("cpuinfo.img records no xsave_size")


@pytest.mark.criu
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="edits the image's x86 entry")
def test_criu_restore_refuses_an_image_of_another_cpu_before_it_restores_anything(tmp_path, monkeypatch):
    """For real: the images of a dumped process, their cpuinfo.img as another CPU's (its xsave size), are refused by
    `criu restore` as an IncompatibleCpuError, and no process is restored; the same images with this CPU's cpuinfo
    restore."""
    require_criu()
    monkeypatch.setattr(criu_mod, "FAILED_LOG_DIR", str(tmp_path / "failed"))
    images = tmp_path / "img"
    images.mkdir()
    tool = subprocess.Popen(["setsid", "sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    restored = None
    try:
        criu = Criu(criu_binary())
        criu.dump(tool.pid, str(images), leave_stopped=False, timeout=60)  # the tree is killed after the dump
        tool.wait(timeout=30)
        own = (images / "cpuinfo.img").read_bytes()
        (images / "cpuinfo.img").write_bytes(_xsave_size_changed(own))
        with pytest.raises(IncompatibleCpuError, match="same instance family: Error .*cpu\\.c.*xsave size mismatch"):
            criu.restore(str(images), pidfile=str(images / "pid"), sibling=False, timeout=60)
        assert not (images / "pid").exists()
        (images / "cpuinfo.img").write_bytes(own)
        restored = criu.restore(str(images), pidfile=str(images / "pid"), sibling=False, timeout=60)
        with open(f"/proc/{restored}/cmdline", "rb") as fh:
            assert fh.read().split(b"\0")[0] == b"sleep"
    finally:
        if restored:
            os.kill(restored, signal.SIGKILL)
        if tool.poll() is None:
            tool.kill()
            tool.wait()


def test_cut_points_fall_back_to_none_without_a_usable_pagemap(tmp_path):
    assert pages_cut_points(str(tmp_path), "pages-1.img", CHUNK_BYTES) == []
    (tmp_path / "pagemap-5.img").write_bytes(b"not a pagemap image at all")
    assert pages_cut_points(str(tmp_path), "pages-1.img", CHUNK_BYTES) == []
    assert pages_cut_points(str(tmp_path), "core-5.img", CHUNK_BYTES) == []


# --- with real CRIU -----------------------------------------------------------------------------------------------
MEM_MIB = 24
WORKLOAD = r"""
import os, time
block = 1 << 20
data = bytearray(os.urandom(MEM_MIB * block))
open("ready", "w").close()
while not os.path.exists("change"):
    time.sleep(0.02)
for i in range(5 * block + 100, 6 * block, 4096):  # change one region in place, without allocating
    data[i] ^= 0xFF
extra = bytearray(300 * 1024)  # and add 75 pages below it: every later page moves in pages-N.img
extra[::4096] = b"x" * len(range(0, len(extra), 4096))
open("changed", "w").close()
while True:
    time.sleep(0.05)
""".replace("MEM_MIB", str(MEM_MIB))


def dump(pid: int, images: str) -> None:
    os.makedirs(images)
    Criu(criu_binary()).dump(pid, images, leave_stopped=True, timeout=60)
    os.kill(pid, signal.SIGCONT)


def pages_images(images: str):
    """{pages_id: bytes listed as present in that id's pagemap} and {pages_id: pages-<id>.img size}."""
    listed, sizes = {}, {}
    for name in os.listdir(images):
        if name.startswith("pagemap-") and name.endswith(".img") and not name.startswith("pagemap-shmem"):
            with open(os.path.join(images, name), "rb") as fh:
                pages_id, entries = criu_mod.pagemap_entries(fh.read())
            present = sum(nr_pages for _vaddr, nr_pages, in_parent in entries if not in_parent)
            listed[pages_id] = present * criu_mod.PAGE_SIZE
        m = name.startswith("pages-") and name.endswith(".img")
        if m:
            sizes[int(name[len("pages-"):-len(".img")])] = os.path.getsize(os.path.join(images, name))
    return listed, sizes


@pytest.fixture
def workload(tmp_path):
    require_criu()
    work = tmp_path / "w"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD], cwd=work, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (work / "ready").exists(), 30, "the workload to fill its memory")
        yield proc, work
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.criu
def test_pagemap_present_pages_add_up_to_the_pages_image(workload, tmp_path):
    proc, _ = workload
    images = str(tmp_path / "d1")
    dump(proc.pid, images)
    listed, sizes = pages_images(images)
    assert sizes and listed.keys() == sizes.keys()
    assert listed == sizes
    assert sum(sizes.values()) > MEM_MIB << 20


@pytest.mark.criu
def test_cut_points_keep_unchanged_memory_in_identical_chunks(workload, tmp_path):
    proc, work = workload
    first, second = str(tmp_path / "d1"), str(tmp_path / "d2")
    dump(proc.pid, first)
    (work / "change").touch()
    wait_for(lambda: (work / "changed").exists(), 30, "the workload to change 1 MiB")
    time.sleep(0.1)
    dump(proc.pid, second)

    chunks = ChunkStore(str(tmp_path / "chunks"), compression="none")

    def store_pages(images):
        name = next(n for n in os.listdir(images) if n.startswith("pages-"))
        cuts = pages_cut_points(images, name, CHUNK_BYTES)
        assert cuts and cuts == sorted(cuts) and cuts[0] == 0
        assert all(0 <= c < os.path.getsize(os.path.join(images, name)) for c in cuts)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            refs, stats, size = store_file(chunks, os.path.join(images, name), pool, cuts)
        assert sum(r.size for r in refs) == size
        return refs, stats, size

    _, st1, size1 = store_pages(first)
    _, st2, size2 = store_pages(second)
    assert st1.bytes_new == size1
    # the changed 1 MiB spans at most two address windows, the new pages one or two more, the interpreter's own
    # heap and stack a little; the 23 untouched MiB of the buffer must be the same chunks as before
    assert st2.bytes_new < 7 * CHUNK_BYTES, (st2.bytes_new, size2)

    plain = ChunkStore(str(tmp_path / "plain"), compression="none")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        store_file(plain, os.path.join(first, "pages-1.img"), pool)
        _, fixed, _ = store_file(plain, os.path.join(second, "pages-1.img"), pool)
    assert fixed.bytes_new > 3 * st2.bytes_new, "fixed-size chunks would have stored the shifted memory again"


def _pagemap(pages_id, *entries):
    """A pagemap image as CRIU 4.x writes it: each entry vaddr (1), compat_nr_pages 0 (2), flags (4), nr_pages (5)."""
    import struct

    def msg(fields):
        return b"".join(criu_mod._varint(k << 3) + criu_mod._varint(v) for k, v in fields)

    msgs = [msg([(1, pages_id)])] + [msg(e) for e in entries]
    return struct.pack("<II", 0x54576519, criu_mod._PAGEMAP_MAGIC) + b"".join(
        struct.pack("<I", len(m)) + m for m in msgs)


PE_PRESENT, PE_PARENT = 4, 1


def test_pagemap_holes_of_a_written_only_dump_are_read_and_filled():
    blob = _pagemap(3, [(1, 0x1000), (2, 0), (4, PE_PRESENT), (5, 2)],
                    [(1, 0x7FFF00003000), (2, 0), (4, PE_PARENT), (5, 300)],
                    [(1, 0x7FFF00200000), (2, 0), (4, PE_PRESENT | 2), (5, 1)])
    assert criu_mod.pagemap_entries(blob) == (3, [(0x1000, 2, False), (0x7FFF00003000, 300, True),
                                                  (0x7FFF00200000, 1, False)])
    filled = criu_mod.pagemap_without_parents(blob)
    assert len(filled) == len(blob)  # one flags byte changed in place
    assert criu_mod.pagemap_entries(filled)[1] == [(0x1000, 2, False), (0x7FFF00003000, 300, False),
                                                   (0x7FFF00200000, 1, False)]
    # what a restore (and the next dump's page table) reads: every page present, in order
    assert criu_mod.pages_runs_from([filled], "pages-3.img") == [(0x1000, 2), (0x7FFF00003000, 300),
                                                                 (0x7FFF00200000, 1)]
    assert criu_mod.pages_runs_from([blob], "pages-3.img") == [(0x1000, 2), (0x7FFF00200000, 1)]


def test_a_pagemap_read_as_it_arrives_equals_the_whole_image():
    """A streamed dump feeds the pagemap in whatever pieces CRIU's writes come in; split anywhere, even inside the
    magic or an entry's size, it reads and patches the same."""
    entries = [[(1, 0x7F0000000000 + k * 0x3000), (2, 0), (4, PE_PARENT if k % 2 else PE_PRESENT), (5, k + 1)]
               for k in range(200)]
    blob = _pagemap(7, *entries)
    whole = criu_mod.pagemap_entries(blob)
    assert whole[0] == 7 and len(whole[1]) == 200 and sum(p for _, _, p in whole[1]) == 100
    for step in (1, 3, 5, 64, len(blob)):
        reader = criu_mod.PagemapReader()
        for at in range(0, len(blob), step):
            reader.feed(blob[at:at + step])
        assert reader.result() == whole
        assert reader.without_parents(blob) == criu_mod.pagemap_without_parents(blob)
    assert criu_mod.pagemap_pages_id(blob) == 7
    cut = criu_mod.PagemapReader()
    cut.feed(blob[:-1])
    with pytest.raises(ValueError, match="ends inside an entry"):
        cut.result()
    bad = criu_mod.PagemapReader()
    bad.feed(b"\0" * 4)
    bad.feed(b"\1" * 8)
    with pytest.raises(ValueError, match="not a pagemap image"):
        bad.result()
    with pytest.raises(ValueError):
        criu_mod.pagemap_pages_id(blob[:10])


@pytest.mark.parametrize("read, magic, kind", [
    (criu_mod.core_task_state, criu_mod._CORE_MAGIC, "core image"),
    (criu_mod.anon_private_vmas, criu_mod._MM_MAGIC, "mm image"),
    (criu_mod.pagemap_pages_id, criu_mod._PAGEMAP_MAGIC, "pagemap image"),
    (criu_mod.pagemap_present_entries, criu_mod._PAGEMAP_MAGIC, "pagemap image"),
])
def test_an_image_of_another_kind_or_cut_inside_its_first_entry_is_refused_by_name(read, magic, kind):
    head = b"\0" * 4 + magic.to_bytes(4, "little")
    entry = b"\x08\x07"  # field 1 = 7: a short first message, whole
    read(head + len(entry).to_bytes(4, "little") + entry)  # whole: read without complaint
    with pytest.raises(ValueError, match=f"^not an? {kind}$"):
        read(b"\0" * 4 + (magic ^ 1).to_bytes(4, "little") + len(entry).to_bytes(4, "little") + entry)
    with pytest.raises(ValueError, match=f"^not an? {kind}$"):
        read(head[:7])
    with pytest.raises(ValueError, match=f"^an? {kind} ends inside its (entry|head)$"):
        read(head + (len(entry) + 1).to_bytes(4, "little") + entry)


def test_a_pagemap_reads_alike_whatever_the_sizes_of_its_vaddrs_and_page_counts():
    """The reader decodes CRIU 4.x's usual entry (a vaddr of 7 varint bytes, nr_pages in 1 or 2) from three words
    and every other entry field by field: vaddrs at the edges of each varint size, page counts of 1 to 3 bytes, the
    flags a dump writes, and entries in older layouts, read whole and in pieces, give the entries they hold and
    fill the same holes."""
    import random

    rng = random.Random(5)
    vaddrs = [0x1000, (1 << 42) - 0x1000, 1 << 42, 0x55D0C0DE0000, 0x7FFFFFFFF000, 1 << 48, (1 << 49) - 0x1000,
              1 << 49, (1 << 56) + 0x1000]
    entries, expected = [], []
    for k in range(600):
        vaddr = rng.choice(vaddrs) if k % 3 else rng.randrange(1 << 42, 1 << 49) & ~0xFFF
        nr = rng.choice([1, 2, 127, 128, 129, 16383, 16384, 1 << 21])
        flags = rng.choice([PE_PARENT, PE_PRESENT, PE_PRESENT | 2])
        if k % 50 == 7:  # images before flags existed: in_parent (3), no flags
            entries.append([(1, vaddr), (3, 1), (5, nr)])
            expected.append((vaddr, nr, True))
            continue
        entries.append([(1, vaddr), (2, 0), (4, flags), (5, nr)])
        expected.append((vaddr, nr, flags == PE_PARENT))
    entries.insert(10, [(1, 0x7F0000001000), (2, 0), (4, PE_PARENT), (5, 0)])  # no pages: not an entry to read
    blob = _pagemap(9, *entries)
    assert criu_mod.pagemap_entries(blob) == (9, expected)
    for step in (7, 20, 4096):
        reader = criu_mod.PagemapReader()
        for at in range(0, len(blob), step):
            reader.feed(blob[at:at + step])
        assert reader.result() == (9, expected)
        filled = reader.without_parents(blob)
        assert criu_mod.pagemap_entries(filled)[1] == [(v, n, False) for v, n, _ in expected]


def test_a_pagemap_in_another_layout_is_filled_by_reencoding_and_garbage_is_refused():
    old_style = _pagemap(1, [(1, 0x1000), (3, 1), (5, 4)])  # in_parent (3), no flags: images before flags existed
    reader = criu_mod.PagemapReader()
    reader.feed(old_style)
    assert reader._flag_bytes is None  # no flags byte to patch: re-encoded
    assert criu_mod.pagemap_entries(criu_mod.pagemap_without_parents(old_style))[1] == [(0x1000, 4, False)]
    with pytest.raises(ValueError):
        criu_mod.pagemap_without_parents(b"not a pagemap at all")
    with pytest.raises(ValueError):
        criu_mod.pagemap_entries(old_style[:-2])  # ends inside an entry


def _criu_recording_env(monkeypatch, patches: str):
    """A Criu built with `patches` whose runs only record the environment they were given (seen["env"])."""
    seen = {}
    c = Criu("/usr/local/sbin/criu",
             run=lambda argv, **kw: seen.setdefault("env", kw.get("env")) or Result(argv, 0, "", ""))
    monkeypatch.setattr(c, "_version_text", lambda: f"Version: 4.2.1\nPatches: {patches}\n")
    return c, seen


def test_the_written_only_patch_is_asked_for_only_when_wanted(monkeypatch):
    c, seen = _criu_recording_env(monkeypatch, "ckpt-agent-0001-rlimits-from-proc ckpt-agent-0002-written-only")
    assert c.can_dump_written_only()
    c.dump(42, "/nonexistent", written_only=True)
    assert seen["env"][criu_mod.WRITTEN_ONLY_ENV] == "1"
    seen.clear()
    c.dump(42, "/nonexistent")
    assert seen["env"] is None
    assert not c.can_dump_soft_dirty_written()  # patch 0003 is not in this build
    assert not c.can_dump_uffd_written()  # nor 0004: without it userfaultfd's written-only dumps are not used
    c, _ = _criu_recording_env(monkeypatch, "ckpt-agent-0001-rlimits-from-proc ckpt-agent-0002-written-only "
                                            "ckpt-agent-0003-soft-dirty ckpt-agent-0004-written-needs-wp")
    assert c.can_dump_uffd_written() and c.can_dump_soft_dirty_written()


def test_a_soft_dirty_dump_names_the_mode_and_when_the_tracking_began(monkeypatch):
    c, seen = _criu_recording_env(monkeypatch, "ckpt-agent-0001-rlimits-from-proc ckpt-agent-0002-written-only "
                                               "ckpt-agent-0003-soft-dirty")
    assert c.can_dump_soft_dirty_written()
    c.dump(42, "/nonexistent", written_only=True, tracked_since_us=123456789)
    assert seen["env"][criu_mod.WRITTEN_ONLY_ENV] == "soft-dirty"
    assert seen["env"][criu_mod.TRACKED_SINCE_ENV] == "123456789"
    seen.clear()
    c.dump(42, "/nonexistent", tracked_since_us=123456789)  # not written-only: every page, whatever the time
    assert seen["env"] is None


# --- which processes CRIU found stopped (core images) -------------------------------------------------------------
def _core(*fields):
    """A core-N.img as CRIU writes it: the two magics, then one core_entry of `fields` ((number, int or bytes))."""
    import struct

    def msg(items):
        out = b""
        for k, v in items:
            if isinstance(v, bytes):
                out += criu_mod._varint(k << 3 | 2) + criu_mod._varint(len(v)) + v
            else:
                out += criu_mod._varint(k << 3) + criu_mod._varint(v)
        return out

    body = msg(fields)
    return struct.pack("<III", 0x54564319, criu_mod._CORE_MAGIC, len(body)) + body


def _task_core(state):
    """task_core_entry: task_state (1), exit_code (2), comm (6), blk_sigset (5), as CRIU fills them."""
    return [(1, state), (2, 0), (6, b"sleep"), (5, 1 << 40)]


def _msg(items):
    return _core(*items)[12:]


def test_the_task_state_is_read_from_a_core_image_and_threads_have_none():
    stopped = _core((1, 1), (2, b"\x0a\x00"), (3, _msg(_task_core(3))), (5, b""))
    alive = _core((1, 1), (3, _msg(_task_core(1))), (5, b""))
    thread = _core((1, 1), (2, b"\x0a\x00"), (5, b"\x08\x01"))  # a thread's core: no task_core_entry
    assert criu_mod.core_task_state(stopped) == criu_mod.TASK_STOPPED
    assert criu_mod.core_task_state(alive) == 1
    assert criu_mod.core_task_state(thread) is None
    images = {"core-7.img": stopped, "core-1.img": alive, "core-8.img": thread, "pstree.img": stopped,
              "core-9.img": stopped[:-3], "core-10.img": b"\0" * 40}
    # a damaged or foreign core image names no process: that one runs again, as before
    assert criu_mod.stopped_tasks(images) == [7]
    for bad in (stopped[:-3], stopped[:11], _core((3, b"\x08")), b"\0" * 40):
        with pytest.raises(ValueError):
            criu_mod.core_task_state(bad)


@pytest.mark.criu
def test_the_process_criu_finds_stopped_is_named_by_its_core_image(tmp_path):
    require_criu()
    script = "import os, signal, time\npid = os.fork()\nif pid == 0:\n    time.sleep(600)\n    os._exit(0)\n" \
             "os.kill(pid, signal.SIGSTOP)\nopen('ready', 'w').write(str(pid))\ntime.sleep(600)\n"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        child = int(wait_for(lambda: (tmp_path / "ready").exists() and (tmp_path / "ready").read_text(), 30,
                             "the child to be stopped"))
        images = str(tmp_path / "d")
        dump(proc.pid, images)
        found = {n: open(os.path.join(images, n), "rb").read() for n in os.listdir(images)
                 if criu_mod.CORE_IMAGE.match(n)}
        assert criu_mod.stopped_tasks(found) == [child]  # not in a PID namespace: the host pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
