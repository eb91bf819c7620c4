"""The image streamer protocol against a fake CRIU that speaks it the way criu/img-streamer.c does."""

from __future__ import annotations

import array
import os
import socket
import threading

import pytest

from ckpt_agent.store import imgstream
from ckpt_agent.store.chunks import ChunkStore


class FakeCriu:
    """Connects like img_streamer_init(), then per file: request, pipe end as SCM_RIGHTS, data."""

    def __init__(self, images_dir: str, name: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.path.join(images_dir, name))

    def open_for_dump(self, filename: str) -> int:
        self.sock.sendall(imgstream.encode_request(filename))
        r, w = os.pipe()
        socket.send_fds(self.sock, [b"\0"], [r])
        os.close(r)
        return w

    def open_for_restore(self, filename: str):
        self.sock.sendall(imgstream.encode_request(filename))
        head = self._recv(4)
        exists = imgstream.decode_reply(self._recv(int.from_bytes(head, "little")))
        if not exists:
            return None
        r, w = os.pipe()
        socket.send_fds(self.sock, [b"\0"], [w])
        os.close(w)
        return r

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            data = self.sock.recv(n - len(buf))
            assert data, "streamer closed the socket"
            buf += data
        return buf

    def close(self) -> None:
        self.sock.close()


class MemorySink:
    def __init__(self, store, name):
        self.store, self.name, self.parts = store, name, []

    def write(self, data):
        self.parts.append(data)

    def close(self):
        self.store[self.name] = b"".join(self.parts)


def test_request_and_reply_round_trip():
    assert imgstream.decode_request(imgstream.encode_request("pages-1.img")[4:]) == "pages-1.img"
    assert imgstream.decode_reply(imgstream.encode_reply(True)[4:]) is True
    assert imgstream.decode_reply(imgstream.encode_reply(False)[4:]) is False
    long = "x" * 300  # a name whose length needs a two-byte varint
    assert imgstream.decode_request(imgstream.encode_request(long)[4:]) == long


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", "", ".."], ids=["dotdot", "slash", "empty", "parent"])
def test_bad_file_names_are_refused(name):
    with pytest.raises(imgstream.StreamError):
        imgstream.decode_request(imgstream.encode_request(name)[4:])


def test_capture_drains_interleaved_pipes(tmp_path):
    """pagemap and pages are open at once and pagemap is closed last: both pipes must be drained side by side,
    or CRIU blocks on a full pipe."""
    got = {}
    server = imgstream.CaptureServer(str(tmp_path), lambda n: MemorySink(got, n)).start()
    criu = FakeCriu(str(tmp_path), imgstream.CAPTURE_SOCKET)
    pagemap = criu.open_for_dump("pagemap-1.img")
    pages = criu.open_for_dump("pages-1.img")
    big = os.urandom(3 << 20)  # far more than a pipe holds
    imgstream.write_all(pages, big)
    os.write(pagemap, b"map")
    os.close(pages)
    os.close(pagemap)
    inv = criu.open_for_dump("inventory.img")
    os.write(inv, b"inv")
    os.close(inv)
    criu.close()
    assert server.finish() == ["pagemap-1.img", "pages-1.img", "inventory.img"]
    assert got == {"pages-1.img": big, "pagemap-1.img": b"map", "inventory.img": b"inv"}
    assert not os.path.exists(tmp_path / imgstream.CAPTURE_SOCKET)


def test_a_failing_sink_fails_the_capture_and_breaks_the_pipe(tmp_path):
    class Broken(MemorySink):
        def write(self, data):
            raise OSError(28, "No space left on device")

    server = imgstream.CaptureServer(str(tmp_path), lambda n: Broken({}, n)).start()
    criu = FakeCriu(str(tmp_path), imgstream.CAPTURE_SOCKET)
    w = criu.open_for_dump("pages-1.img")
    with pytest.raises(BrokenPipeError):  # what CRIU sees: EPIPE, so the dump fails rather than hangs
        for _ in range(64):
            imgstream.write_all(w, bytes(1 << 20))
    os.close(w)
    criu.close()
    with pytest.raises(imgstream.StreamError, match="No space left"):
        server.finish()


def test_abort_before_criu_connects_returns(tmp_path):
    server = imgstream.CaptureServer(str(tmp_path), lambda n: MemorySink({}, n)).start()
    server.abort()
    assert not os.path.exists(tmp_path / imgstream.CAPTURE_SOCKET)


def test_a_garbage_peer_is_an_error(tmp_path):
    server = imgstream.CaptureServer(str(tmp_path), lambda n: MemorySink({}, n)).start()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(tmp_path / imgstream.CAPTURE_SOCKET))
        s.sendall((1 << 30).to_bytes(4, "little"))
    with pytest.raises(imgstream.StreamError):
        server.finish()


class DictSource:
    def __init__(self, images):
        self.images = images

    def exists(self, name):
        return name in self.images

    def write_to(self, name, fd):
        imgstream.write_all(fd, self.images[name])


def test_serve_answers_exists_and_feeds_the_pipe(tmp_path):
    big = os.urandom(2 << 20)
    server = imgstream.ServeServer(str(tmp_path), DictSource({"pages-1.img": big, "inventory.img": b"i"})).start()
    criu = FakeCriu(str(tmp_path), imgstream.SERVE_SOCKET)
    assert criu.open_for_restore("no-such.img") is None
    r = criu.open_for_restore("pages-1.img")
    out = []
    reader = threading.Thread(target=lambda: out.append(b"".join(iter(lambda: os.read(r, 1 << 16), b""))))
    reader.start()
    reader.join()
    os.close(r)
    r = criu.open_for_restore("inventory.img")
    assert os.read(r, 10) == b"i"
    os.close(r)
    criu.close()
    assert out == [big]
    assert server.finish() == {"pages-1.img": 1, "inventory.img": 1}


F_GETPIPE_SZ = 1032  # fcntl(2), Linux


def test_capture_and_serve_widen_criu_pipes(tmp_path):
    """Both directions widen the pipe CRIU passes to PIPE_BYTES: at the default 64 KiB, CRIU's read() of a restored
    region wakes up every 16 pages (a 1 GiB streamed restore took 2.0 s instead of 1.4 s)."""
    import fcntl

    got = {}
    (tmp_path / "c").mkdir()
    capture = imgstream.CaptureServer(str(tmp_path / "c"), lambda n: MemorySink(got, n)).start()
    criu = FakeCriu(str(tmp_path / "c"), imgstream.CAPTURE_SOCKET)
    w = criu.open_for_dump("pages-1.img")
    big = os.urandom(imgstream.PIPE_BYTES)
    os.write(w, big[:1])  # the server drains (and so has widened) once this is gone
    imgstream.write_all(w, big[1:])  # more than a 64 KiB pipe takes without a reader
    assert fcntl.fcntl(w, F_GETPIPE_SZ) == imgstream.PIPE_BYTES
    os.close(w)
    criu.close()
    capture.finish()
    assert got == {"pages-1.img": big}

    server = imgstream.ServeServer(str(tmp_path), DictSource({"pages-1.img": big})).start()
    criu = FakeCriu(str(tmp_path), imgstream.SERVE_SOCKET)
    r = criu.open_for_restore("pages-1.img")
    first = os.read(r, 1)  # the feeder widened the pipe before its first write
    assert fcntl.fcntl(r, F_GETPIPE_SZ) == imgstream.PIPE_BYTES
    rest = b"".join(iter(lambda: os.read(r, 1 << 20), b""))
    os.close(r)
    criu.close()
    assert first + rest == big
    assert server.finish() == {"pages-1.img": 1}


def test_serve_finish_without_criu_returns(tmp_path):
    server = imgstream.ServeServer(str(tmp_path), DictSource({})).start()
    assert server.finish() == {}


# --- the store side: streamdump's sinks fed by the fake CRIU ------------------------------------------------------
def _pagemap(pages_id: int, runs) -> bytes:
    """A CRIU pagemap image: magics, pagemap_head{pages_id}, then pagemap_entry{vaddr, flags=PRESENT, nr_pages}."""
    def msg(fields):
        body = b"".join(bytes([(num << 3) | 0]) + imgstream._varint(val) for num, val in fields)
        return len(body).to_bytes(4, "little") + body

    out = (0x54123737).to_bytes(4, "little") + (0x56084025).to_bytes(4, "little") + msg([(1, pages_id)])
    for vaddr, nr in runs:
        out += msg([(1, vaddr), (4, 4), (5, nr)])
    return out


def _dump(tmp_path, chunks, pool, images, previous=None):
    from ckpt_agent.checkpoint import streamdump

    imgdir = tmp_path / f"img{len(list(tmp_path.iterdir()))}"
    imgdir.mkdir()
    sd = streamdump.StreamDump(chunks, pool, str(imgdir), previous).start()
    criu = FakeCriu(str(imgdir), imgstream.CAPTURE_SOCKET)
    fds = {name: criu.open_for_dump(name) for name in images}  # all open at once, as CRIU keeps pagemap and pages
    for name, data in images.items():
        imgstream.write_all(fds[name], data)
        os.close(fds[name])
    criu.close()
    return sd.finish()


def _read_back(chunks, images, name, pool=None):
    from ckpt_agent.checkpoint import streamdump

    r, w = os.pipe()
    out = []
    reader = threading.Thread(target=lambda: out.append(b"".join(iter(lambda: os.read(r, 1 << 16), b""))))
    reader.start()
    try:
        streamdump.StoreSource(chunks, images, pool).write_to(name, w)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    return out[0]


def test_streamed_pages_are_stored_and_an_incremental_stores_only_changed_pages(tmp_path, chunks, pool):
    pytest.importorskip("xxhash")
    from ckpt_agent.store import pagedelta

    page = pagedelta.PAGE
    npages = 1024  # 4 MiB in two mappings
    runs = [(0x7F0000000000, 600), (0x7F1000000000, npages - 600)]
    data = bytearray(os.urandom(npages * page))
    gen1, st1 = _dump(tmp_path, chunks, pool, {"pagemap-1.img": _pagemap(1, runs), "pages-1.img": bytes(data),
                                                "inventory.img": b"inv"})
    by_name = {i.name: i for i in gen1}
    assert by_name["pages-1.img"].pagetable.pages == npages
    assert _read_back(chunks, gen1, "pages-1.img") == bytes(data)
    assert _read_back(chunks, gen1, "inventory.img") == b"inv"

    changed = list(range(0, npages, 20))  # 5% of the pages, spread out
    for p in changed:
        data[p * page:(p + 1) * page] = os.urandom(page)
    gen2, st2 = _dump(tmp_path, chunks, pool, {"pagemap-1.img": _pagemap(1, runs), "pages-1.img": bytes(data)},
                      previous=_manifest(gen1))
    assert _read_back(chunks, gen2, "pages-1.img") == bytes(data)
    pages2 = {i.name: i for i in gen2}["pages-1.img"]
    assert pages2.delta_depth == 1
    assert st2.bytes_new <= len(changed) * page + 64 * 1024  # the changed pages plus the new page table
    assert st1.bytes_new >= npages * page


@pytest.mark.parametrize("prefetch, held", [(8, 32), (1, 0)], ids=["default", "evicting"])
def test_a_delta_image_is_served_in_order_with_chunks_read_ahead(tmp_path, chunks, pool, monkeypatch, prefetch, held):
    """The restore side reads chunks ahead in the pool; a delta's slices go back to chunks used before, which are
    held (or, when evicted, read again): the bytes CRIU reads are the image's, in order, either way."""
    pytest.importorskip("xxhash")
    from ckpt_agent.checkpoint import streamdump
    from ckpt_agent.store import pagedelta

    monkeypatch.setattr(streamdump, "PREFETCH_CHUNKS", prefetch)
    monkeypatch.setattr(streamdump, "HELD_CHUNKS", held)
    page = pagedelta.PAGE
    npages = 2048
    runs = [(0x7F0000000000, npages)]
    data = bytearray(os.urandom(npages * page))
    gen1, _ = _dump(tmp_path, chunks, pool, {"pagemap-1.img": _pagemap(1, runs), "pages-1.img": bytes(data)})
    for p in range(3, npages, 37):  # changed pages all over: new chunks interleave with the old ones
        data[p * page:(p + 1) * page] = os.urandom(page)
    gen2, _ = _dump(tmp_path, chunks, pool, {"pagemap-1.img": _pagemap(1, runs), "pages-1.img": bytes(data)},
                    previous=_manifest(gen1))
    pages2 = {i.name: i for i in gen2}["pages-1.img"]
    assert len(pages2.slices) > len(pages2.chunks)  # slices come back to chunks used before
    assert _read_back(chunks, gen2, "pages-1.img", pool) == bytes(data)
    assert _read_back(chunks, gen1, "pages-1.img", pool) != bytes(data)


def test_a_damaged_chunk_read_ahead_fails_the_image(tmp_path, chunks, pool):
    from ckpt_agent.errors import DamagedCheckpointError

    gen1, _ = _dump(tmp_path, chunks, pool, {"inventory.img": os.urandom(5 << 20)})
    img = gen1[0]
    with open(chunks.path(img.chunks[3]), "r+b") as fh:
        fh.write(b"garbage")
    with pytest.raises(DamagedCheckpointError, match="image inventory.img"):
        _read_back(chunks, gen1, "inventory.img", pool)


def test_whole_image_reads_whole_chunks_and_slices(chunks):
    """A small image read whole (a pagemap, an mm image): from its chunks one after the other, and right too if it
    were slices of chunks (taken out of order, one chunk twice)."""
    from ckpt_agent.checkpoint import streamdump
    from ckpt_agent.store import pagedelta

    a, b = os.urandom(5000), os.urandom(3000)
    ra, rb = chunks.put(a)[0], chunks.put(b)[0]
    whole = pagedelta.sliced_entry("pagemap-1.img", 8000, [(ra, 0, 5000), (rb, 0, 3000)])
    assert whole.slices is None and streamdump.whole_image(chunks, whole) == a + b
    sliced = pagedelta.sliced_entry("mm-1.img", 3100, [(rb, 1000, 600), (ra, 10, 2000), (rb, 0, 500)])
    assert sliced.slices is not None
    assert streamdump.whole_image(chunks, sliced) == b[1000:1600] + a[10:2010] + b[:500]


def test_reuse_map_points_each_page_hash_into_its_chunk():
    from ckpt_agent.checkpoint.streamdump import ReuseMap
    from ckpt_agent.store import pagedelta
    from ckpt_agent.store.chunks import ChunkRef

    a, b = ChunkRef("aa" * 32, 1 << 20, "r"), ChunkRef("bb" * 32, 1 << 20, "r")
    m = ReuseMap()
    assert not m and m.get(b"x" * 16) is None
    m.add_pages([b"1" * 16, b"2" * 16], a, 0)
    m.add_pages([b"3" * 16], b, 5 * pagedelta.PAGE)
    m.add_pages([b"4" * 16], ChunkRef("aa" * 32, 1 << 20, "r"), 9 * pagedelta.PAGE)  # the same chunk again
    assert m.get(b"2" * 16) == (a, pagedelta.PAGE) and m.get(b"3" * 16) == (b, 5 * pagedelta.PAGE)
    assert m.get(b"4" * 16) == (a, 9 * pagedelta.PAGE) and len(m.refs) == 2 and len(m) == 4
    m.drop({a.digest})
    assert b"1" * 16 not in m and m.get(b"3" * 16) == (b, 5 * pagedelta.PAGE) and len(m) == 1


def test_read_block_fills_whole_blocks_from_a_pipe_written_in_small_pieces():
    r, w = os.pipe()
    data = os.urandom(3 * 65536 + 100)

    def writer():
        for i in range(0, len(data), 1000):
            os.write(w, data[i:i + 1000])
        os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    try:
        imgstream.widen_pipe(r)
        blocks = []
        while True:
            block = imgstream.read_block(r, 65536)
            blocks.append(block)
            if len(block) < 65536:
                break
    finally:
        t.join()
        os.close(r)
    assert [len(b) for b in blocks] == [65536, 65536, 65536, 100] and b"".join(blocks) == data


def test_a_rotten_previous_chunk_is_not_reused(tmp_path, chunks, pool):
    pytest.importorskip("xxhash")
    from ckpt_agent.store import pagedelta

    runs = [(0x7F0000000000, 512)]
    data = os.urandom(512 * pagedelta.PAGE)
    gen1, _ = _dump(tmp_path, chunks, pool, {"pagemap-1.img": _pagemap(1, runs), "pages-1.img": data})
    pages1 = {i.name: i for i in gen1}["pages-1.img"]
    rotten = pages1.chunks[0].digest
    path = chunks.path(pages1.chunks[0])
    with open(path, "r+b") as fh:
        fh.write(b"garbage")
    chunks = ChunkStore(chunks.root, known=chunks.known)  # the next checkpoint's, as the engine makes one each
    chunks.verify_reused = lambda _d: True  # a final checkpoint verifies every chunk it reuses
    gen2, st2 = _dump(tmp_path, chunks, pool, {"pagemap-1.img": _pagemap(1, runs), "pages-1.img": data},
                      previous=_manifest(gen1))
    assert _read_back(chunks, gen2, "pages-1.img") == data  # repaired: the rotten chunk was written again
    assert st2.chunks_verified >= 1 and st2.chunks_repaired == 1
    assert rotten in {c.digest for c in {i.name: i for i in gen2}["pages-1.img"].chunks}


def _manifest(images):
    """The previous generation as the engine hands it over: a manifest holding these images."""
    from ckpt_agent.store.manifest import Manifest

    return Manifest(format=2, created="2026-12-03T00:00:00.000000Z", images=images, files=[])


def _failing_dump(tmp_path, chunks, pool, name: str, data: bytes):
    """A streamed dump of one image whose store side fails: written as CRIU would (a broken pipe included, once the
    failing sink has closed its end), the connection then closed; the StreamDump, to finish() or abort()."""
    from ckpt_agent.checkpoint import streamdump

    imgdir = tmp_path / "img"
    imgdir.mkdir()
    sd = streamdump.StreamDump(chunks, pool, str(imgdir)).start()
    criu = FakeCriu(str(imgdir), imgstream.CAPTURE_SOCKET)
    fd = criu.open_for_dump(name)
    try:
        imgstream.write_all(fd, data)
    except BrokenPipeError:
        pass
    os.close(fd)
    criu.close()  # as CRIU does when it fails
    return sd


def test_a_store_that_fails_during_a_failed_dump_is_named_not_criu(tmp_path, chunks, pool, monkeypatch):
    """A full store makes CRIU fail with only "Broken pipe": abort() hands back the store's error, which the engine
    raises (exit 74, naming the path) instead of CRIU's."""
    import errno


    def full(data):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "store" / "chunk"))

    monkeypatch.setattr(chunks, "put", full)
    # whole chunks: handed to the store while the dump goes on
    sd = _failing_dump(tmp_path, chunks, pool, "inventory.img", b"x" * (3 << 20))
    cause = sd.abort()
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    assert imgstream.StreamError("x").exit_code == 69  # a broken stream is a failed dump or restore, not a bug


def test_the_reuse_map_is_built_beside_criu_and_its_failure_fails_the_dump(tmp_path, chunks, pool, monkeypatch):
    """The previous generation's page map is built while CRIU starts; a store error building it (an unreadable
    page table) fails the dump, naming the store, instead of being lost in a thread."""
    from ckpt_agent.checkpoint import streamdump
    from ckpt_agent.errors import StoreError

    started = threading.Event()

    def failing(*_a, **_kw):
        started.set()
        raise StoreError("/store/job/chunks/ab/abcd: cannot read chunk")

    monkeypatch.setattr(streamdump, "reuse_map", failing)
    sd = _failing_dump(tmp_path, chunks, pool, "pages-1.img", os.urandom(1 << 20))
    with pytest.raises(StoreError, match="cannot read chunk"):
        sd.finish()
    assert started.is_set()


def test_writev_all_writes_every_buffer_in_order_through_short_writes(monkeypatch):
    """A delta image's pieces go to CRIU's pipe several per writev; a short write (a signal, a full pipe) resumes
    where it stopped, mid-buffer included."""
    views = [memoryview(os.urandom(n)) for n in [4096, 1, 8192, 4096, 3000, 1, 65536] * 100]
    expected = b"".join(bytes(v) for v in views)
    real = os.writev
    calls = []

    def short(fd, bufs):
        calls.append(len(bufs))
        assert len(bufs) <= imgstream.IOV_BATCH
        out, room = [], 5000  # at most 5000 bytes a call
        for b in bufs:
            out.append(b[:room])
            room -= len(out[-1])
            if not room:
                break
        return real(fd, out)

    monkeypatch.setattr(os, "writev", short)
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(b) for b in iter(lambda: os.read(r, 1 << 16), b"")])
    reader.start()
    try:
        imgstream.writev_all(w, views)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == expected and len(calls) > 1


def _address(buf) -> int:
    """Where an anonymous mmap lies in memory (what chunks.ReadBuffer.address holds)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _lend_an_image(nbufs: int, size: int, capacity: int, scribble: bool = True):
    """Feed an image of `nbufs` buffers of `size` bytes through a pipe of `capacity` bytes, each buffer lent as
    one piece, and read it back only once the pipe is full (CRIU lagging as far as it can): (bytes read, the
    expected bytes, buffers reused in order, the feed). A reused buffer is scribbled over at once, as a chunk read
    into it next would: a buffer reused while its bytes were still in the pipe shows as wrong bytes read."""
    import fcntl
    import mmap
    import termios

    bufs = []
    for _ in range(nbufs):
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m[:] = os.urandom(size)
        bufs.append(m)
    expected = b"".join(bytes(m) for m in bufs)
    r, w = os.pipe()
    fcntl.fcntl(w, imgstream.F_SETPIPE_SZ, capacity)
    reused = []

    def reuse(buf):
        reused.append(buf)
        if scribble:
            buf[:] = b"\xff" * size

    got = bytearray()
    done = threading.Event()

    def reader():
        level = array.array("i", [0])
        while not done.is_set():  # the pipe full, or the whole image written into it
            fcntl.ioctl(r, termios.FIONREAD, level)
            if level[0] >= capacity:
                break
            threading.Event().wait(0.001)
        got.extend(b"".join(iter(lambda: os.read(r, 1 << 16), b"")))

    t = threading.Thread(target=reader)
    t.start()
    try:
        feed = imgstream.PipeFeed(w, nbufs * size, reuse)
        for m in bufs:
            feed.write([(memoryview(m), _address(m))], [m])
        done.set()
    finally:
        os.close(w)
        t.join()
        os.close(r)
    return bytes(got), expected, reused, feed


def test_a_lent_buffer_is_reused_only_once_criu_has_read_it():
    """Restore lends the chunks' buffers to CRIU's pipe (vmsplice): a buffer is reused only after a pipe's capacity
    more has been written behind it, and the image's last capacity's worth is copied, so every buffer is reused by
    its end and CRIU reads exactly what was checked."""
    got, expected, reused, feed = _lend_an_image(nbufs=48, size=16 << 10, capacity=64 << 10)
    assert got == expected
    assert feed.capacity == 64 << 10
    assert 0 < feed.lent_bytes <= len(expected) - feed.capacity
    assert len(reused) == 48  # nothing left lent at the end


def test_pieces_that_are_not_in_a_lent_buffer_are_copied():
    r, w = os.pipe()
    data = [os.urandom(5000), os.urandom(7000)]
    reused = []
    feed = imgstream.PipeFeed(w, 12000, reused.append)
    feed.write([(memoryview(d), None) for d in data], ["buffer"])
    os.close(w)
    assert os.read(r, 1 << 20) == b"".join(data)
    os.close(r)
    assert feed.lent_bytes == 0 and reused == ["buffer"]  # copied: reusable at once


def test_a_buffer_whose_last_piece_is_copied_waits_for_its_pieces_lent_before():
    """A delta image takes several pieces from one chunk: its early pieces may be lent and its last one copied (the
    image's tail). The buffer is reused only once the lent ones are read, whatever the copied one's position."""
    import fcntl
    import mmap
    import termios

    k, cap = 16 << 10, 64 << 10
    bufs = {}
    for name in ("b0", "b1", "b2", "x", "b3", "b4", "b5", "b6"):
        bufs[name] = mmap.mmap(-1, k, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        bufs[name][:] = os.urandom(k)
    h = k // 2
    # (buffer, offset, length, done with it after this write); 128 KiB in all, so the last 64 KiB are copied
    writes = [("b0", 0, k, True), ("b1", 0, k, True), ("b2", 0, k, True), ("x", 0, h, False), ("b3", 0, h, False),
              ("x", h, h, True), ("b3", h, h, True), ("b4", 0, k, True), ("b5", 0, k, True), ("b6", 0, k, True)]
    expected = b"".join(bytes(bufs[b][o:o + n]) for b, o, n, _d in writes)
    r, w = os.pipe()
    fcntl.fcntl(w, imgstream.F_SETPIPE_SZ, cap)
    reused = []

    def reuse(buf):  # the next chunk read into it
        reused.append(buf)
        buf[:] = b"\xff" * k

    got = bytearray()
    done = threading.Event()

    def reader():  # CRIU lagging: a page at a time, and only when the pipe is full
        level = array.array("i", [0])
        while True:
            fcntl.ioctl(r, termios.FIONREAD, level)
            if done.is_set():
                break
            if level[0] < cap:
                threading.Event().wait(0.001)
                continue
            got.extend(os.read(r, 4096))
        got.extend(b"".join(iter(lambda: os.read(r, 1 << 16), b"")))

    t = threading.Thread(target=reader)
    t.start()
    try:
        feed = imgstream.PipeFeed(w, len(expected), reuse)
        for b, o, n, last in writes:
            piece = (memoryview(bufs[b])[o:o + n], _address(bufs[b]) + o)
            feed.write([piece], [bufs[b]] if last else [])
        done.set()
    finally:
        os.close(w)
        t.join()
        os.close(r)
    assert bytes(got) == expected
    assert feed.lent_bytes == cap and len(reused) == 8
