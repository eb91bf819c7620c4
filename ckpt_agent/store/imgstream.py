"""CRIU's image streamer protocol (`criu dump|restore --stream`), spoken by us instead of criu-image-streamer.

The protocol (criu/img-streamer.c and images/img-streamer.proto of CRIU 4.2):
  - dump: CRIU connects to `<images dir>/streamer-capture.sock`. For every image file it opens it sends a request
    (u32 little-endian length + protobuf `img_streamer_request_entry{1: filename}`), then the read end of a fresh
    pipe as SCM_RIGHTS on a one-byte message, and writes the image into the pipe's other end. Several pipes are
    open at once (pagemap-N.img and pages-N.img are written side by side and closed at the end), so every pipe is
    drained by its own thread: a pipe left unread would block CRIU. CRIU closes the socket when no more files come.
  - restore: CRIU connects to `streamer-serve.sock` and sends the same request; we reply
    (u32 length + `img_streamer_reply_entry{1: exists}`), and when the file exists CRIU sends the write end of a
    pipe, from which it reads the image once, front to back.
Images CRIU opens with O_FORCE_LOCAL (its stats files) never come through the socket; they stay in the images dir.

Bounded memory: a pipe is read READ_BYTES at a time (one chunk's worth: a sink hands a whole aligned block on to the
chunk store as it is) and handed to the sink at once; the sinks (streamdump.py) keep
at most a few chunks in flight. An error in a sink closes that pipe, so CRIU fails with EPIPE instead of waiting.
"""

from __future__ import annotations

import array
import collections
import ctypes
import errno
import logging
import os
import socket
import struct
import threading
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from ckpt_agent.adapters.criu import read_varint
from ckpt_agent.errors import CriuError

log = logging.getLogger(__name__)

CAPTURE_SOCKET = "streamer-capture.sock"
SERVE_SOCKET = "streamer-serve.sock"
READ_BYTES = 1 << 20  # one read from a pipe: a chunk's worth, the unit the sinks work in
MAX_MESSAGE_BYTES = 1 << 16  # a request holds a file name; anything longer is not CRIU speaking
_U32 = struct.Struct("<I")
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class StreamError(CriuError):
    """CRIU's side of the stream broke the protocol or went away (exit 69, as any failed dump or restore)."""


# --- protobuf, the two tiny messages only ------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    try:
        return read_varint(buf, pos)
    except ValueError as e:
        raise StreamError(str(e)) from None


def encode_request(filename: str) -> bytes:
    name = filename.encode()
    msg = b"\x0a" + _varint(len(name)) + name
    return _U32.pack(len(msg)) + msg


def decode_request(msg: bytes) -> str:
    pos = 0
    name = None
    while pos < len(msg):
        key, pos = _read_varint(msg, pos)
        wire = key & 7
        if wire == 2:
            n, pos = _read_varint(msg, pos)
            if pos + n > len(msg):
                raise StreamError("truncated request")
            if key >> 3 == 1:
                name = msg[pos:pos + n].decode("utf-8", "strict")
            pos += n
        elif wire == 0:
            _, pos = _read_varint(msg, pos)
        else:
            raise StreamError(f"unexpected wire type {wire} in a request")
    if not name or "/" in name or name in (".", ".."):
        raise StreamError(f"bad image file name in a request: {name!r}")
    return name


def encode_reply(exists: bool) -> bytes:
    msg = b"\x08" + (b"\x01" if exists else b"\x00")
    return _U32.pack(len(msg)) + msg


def decode_reply(msg: bytes) -> bool:
    if len(msg) >= 2 and msg[0] == 0x08:
        return bool(_read_varint(msg, 1)[0])
    raise StreamError("bad reply")


# --- socket I/O -----------------------------------------------------------------------------------------------
class _Conn:
    """One accepted connection; every read is a recvmsg that also collects passed descriptors (a descriptor rides
    on a one-byte message, which a plain recv would swallow together with the descriptor)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds: List[int] = []

    def recv_exact(self, n: int, eof_ok: bool = False) -> Optional[bytes]:
        buf = bytearray()
        while len(buf) < n:
            data, anc, _flags, _addr = self.sock.recvmsg(n - len(buf), _FD_SPACE)
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.fds.extend(fds)
            if not data:
                if eof_ok and not buf:
                    return None
                raise StreamError("CRIU closed the streamer socket mid-message")
            buf += data
        return bytes(buf)

    def recv_message(self) -> Optional[bytes]:
        head = self.recv_exact(4, eof_ok=True)
        if head is None:
            return None
        (size,) = _U32.unpack(head)
        if size > MAX_MESSAGE_BYTES:
            raise StreamError(f"streamer message of {size} bytes")
        return self.recv_exact(size)

    def recv_fd(self) -> int:
        while not self.fds:
            self.recv_exact(1)  # the dummy byte the descriptor rides on
        return self.fds.pop(0)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


# sockaddr_un's sun_path: CRIU builds the socket's address from the images directory and cuts it at this length
SUN_PATH_MAX = 108


def sockets_fit(images_dir: str) -> bool:
    """Whether CRIU can reach the streamer's sockets in `images_dir` (a path too long for a Unix socket address is
    cut short by CRIU, which then connects nowhere)."""
    longest = max(len(CAPTURE_SOCKET), len(SERVE_SOCKET))
    return len(os.fsencode(os.path.join(os.path.abspath(images_dir), "x" * longest))) < SUN_PATH_MAX


def _listen(images_dir: str, name: str) -> socket.socket:
    path = os.path.join(images_dir, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def _stop_listening(server, name: str) -> None:
    """End a server's accept loop once CRIU has exited. When CRIU never connected, the accept() is woken by a
    connection of our own (queued behind any real one, which is served first), which reads EOF at once; the
    listening socket is closed only after that, so a connection already queued is never lost."""
    server._closing = True
    if server._conn is None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(os.path.join(server.images_dir, name))
        except OSError:
            pass
    server._main.join()
    server._sock.close()


# --- capture (dump) ---------------------------------------------------------------------------------------------
class _Server:
    """What the capture and the serve server share: the listening socket in the images dir, the accept thread, and
    the errors of the threads serving it (the first one is raised by finish())."""

    SOCKET = ""
    THREAD = ""

    def __init__(self, images_dir: str):
        self.images_dir = images_dir
        self.errors: List[BaseException] = []
        self._lock = threading.Lock()
        self._sock = _listen(images_dir, self.SOCKET)
        self._threads: List[threading.Thread] = []
        self._main = threading.Thread(target=self._serve, name=self.THREAD, daemon=True)
        self._conn: Optional[_Conn] = None

    _closing = False

    def _serve(self) -> None:
        """Accept CRIU's one connection and answer each request on it until CRIU closes it."""
        try:
            sock, _ = self._sock.accept()
        except OSError as e:  # closed by abort() before CRIU connected
            if not self._closing:
                self._fail(e)
            return
        self._conn = conn = _Conn(sock)
        try:
            while True:
                msg = conn.recv_message()
                if msg is None:
                    return  # CRIU is done opening images
                self._request(conn, decode_request(msg))
        except (OSError, StreamError) as e:
            self._fail(e)
        finally:
            conn.close()

    def _request(self, conn: _Conn, name: str) -> None:
        raise NotImplementedError

    def _spawn(self, target, name: str, fd: int, thread_name: str) -> None:
        t = threading.Thread(target=target, args=(name, fd), name=thread_name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def start(self):
        self._main.start()
        return self

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            self.errors.append(e)


class ImageSink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class CaptureServer(_Server):
    """Receive the images of one `criu dump --stream`: `open_sink(name)` gives the sink each image is fed to.

    start() before CRIU runs; finish() after it exited: waits for every pipe to drain and raises the first error a
    sink or the protocol hit (the dump is then not to be committed). abort() when CRIU failed.
    """

    SOCKET, THREAD = CAPTURE_SOCKET, "imgstream-capture"

    def __init__(self, images_dir: str, open_sink: Callable[[str], ImageSink]):
        super().__init__(images_dir)
        self.open_sink = open_sink
        self.names: List[str] = []

    def _stop_listening(self) -> None:
        _stop_listening(self, CAPTURE_SOCKET)

    def _request(self, conn: _Conn, name: str) -> None:
        fd = conn.recv_fd()
        with self._lock:
            self.names.append(name)
        self._spawn(self._drain, name, fd, f"imgstream-{name}")

    def _drain(self, name: str, fd: int) -> None:
        try:
            widen_pipe(fd)
            sink = self.open_sink(name)
            while True:
                block = read_block(fd, READ_BYTES)
                if block:
                    sink.write(block)
                if len(block) < READ_BYTES:
                    break
            sink.close()
        except BaseException as e:  # noqa: BLE001 - reported by finish(); closing the pipe makes CRIU fail too
            log.debug("image %s: %s", name, e)
            self._fail(e)
        finally:
            os.close(fd)

    def _join(self) -> None:
        self._main.join()
        while True:
            with self._lock:
                pending = [t for t in self._threads if t.is_alive()]
            if not pending:
                return
            for t in pending:
                t.join()

    def finish(self) -> List[str]:
        """Wait until every image is stored; the names received, in order. Raises the first error."""
        self._stop_listening()
        self._join()
        self._unlink()
        if self.errors:
            e = self.errors[0]
            raise e if not isinstance(e, OSError) else StreamError(f"image stream: {e}")
        return list(self.names)

    def abort(self) -> None:
        """CRIU failed or never ran: stop listening, let the drains end (the pipes' writers are gone)."""
        self._stop_listening()
        self._join()
        self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(os.path.join(self.images_dir, CAPTURE_SOCKET))
        except OSError:
            pass


F_SETPIPE_SZ = 1031  # fcntl(2), Linux
F_GETPIPE_SZ = 1032
PIPE_BYTES = 1 << 20  # what CRIU's pipes are widened to (the default 64 KiB costs a wake-up per 16 pages; 4 MiB and
# 512 KiB made full checkpoints slower, 4 MiB restores too: docs/performance.md)


def widen_pipe(fd: int) -> None:
    """Make a pipe CRIU passed hold PIPE_BYTES, so it splices a chunk's worth at a time; best effort (an ordinary
    user's pipes may be capped by fs.pipe-user-pages-soft, and then stay as they are)."""
    import fcntl

    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


def read_block(fd: int, size: int) -> bytearray:
    """Up to `size` bytes from a pipe into a fresh buffer, filled whole unless the writer closed its end first:
    the sinks then get chunk-sized blocks they can hand on as they are, without copying them again."""
    block = bytearray(size)
    view = memoryview(block)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    view.release()
    if got < size:
        del block[got:]
    return block


# --- serve (restore) --------------------------------------------------------------------------------------------
class ImageSource(Protocol):
    def exists(self, name: str) -> bool: ...

    def write_to(self, name: str, fd: int) -> None: ...


class ServeServer(_Server):
    """Serve images to one `criu restore --stream` from `source`. start() before CRIU runs, finish() after."""

    SOCKET, THREAD = SERVE_SOCKET, "imgstream-serve"

    def __init__(self, images_dir: str, source: ImageSource):
        super().__init__(images_dir)
        self.source = source
        self.served: Dict[str, int] = {}
        self._closing = False

    def _request(self, conn: _Conn, name: str) -> None:
        exists = self.source.exists(name)
        conn.sock.sendall(encode_reply(exists))
        if not exists:
            return
        fd = conn.recv_fd()
        with self._lock:
            self.served[name] = self.served.get(name, 0) + 1
        self._spawn(self._feed, name, fd, f"imgserve-{name}")

    def _feed(self, name: str, fd: int) -> None:
        try:
            widen_pipe(fd)
            self.source.write_to(name, fd)
        except BrokenPipeError:
            log.debug("CRIU stopped reading %s", name)  # it read what it needed (or failed, which it reports)
        except BaseException as e:  # noqa: BLE001 - reported by finish(); CRIU sees a short image and fails
            self._fail(e)
        finally:
            os.close(fd)

    def finish(self) -> Dict[str, int]:
        _stop_listening(self, SERVE_SOCKET)
        self._main.join()
        for t in list(self._threads):
            t.join()
        try:
            os.unlink(os.path.join(self.images_dir, SERVE_SOCKET))
        except OSError:
            pass
        if self.errors:
            e = self.errors[0]
            raise e if not isinstance(e, OSError) else StreamError(f"image serve: {e}")
        return dict(self.served)


def write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


IOV_BATCH = 512  # buffers a writev_all call hands the kernel at most (Linux's IOV_MAX is 1024)


def writev_all(fd: int, views: List[memoryview]) -> None:
    """Write these buffers in order, several per system call (a delta image is served as one slice per run of pages:
    a write each cost a system call per 4 KiB of scattered changes)."""
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + IOV_BATCH])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


# --- handing pages to CRIU by reference --------------------------------------------------------------------------
class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
try:
    _vmsplice = _libc.vmsplice
    _vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_size_t, ctypes.c_uint]
    _vmsplice.restype = ctypes.c_ssize_t
except AttributeError:  # not glibc: every image is copied into its pipe
    _vmsplice = None


def pipe_bytes(fd: int) -> Optional[int]:
    """The pipe's capacity in bytes, or None when `fd` is not a pipe."""
    import fcntl

    try:
        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except OSError:
        return None


class PipeFeed:
    """One image of `total` bytes written into the pipe CRIU reads it from, with pieces that lie in buffers of the
    caller's own handed over by reference (vmsplice(2)) instead of copied in. CRIU's read() then copies each page
    once, out of those buffers, straight into the restored memory. Copied in, a page was allocated for the pipe,
    written, read and freed again, 4 KiB at a time.

    A spliced piece is the buffer itself until CRIU has read it. So a buffer the caller is done with is reused
    (`reuse`, called with it) only once CRIU has certainly read every piece lent so far, its own among them (a
    buffer's earlier pieces may have been lent while its last one is copied): a pipe holds at most its capacity
    (F_GETPIPE_SZ; CRIU never resizes these pipes), so every byte written that many bytes before the last one written
    has been read out. The image's last capacity's worth is copied in, so when the image ends nothing is still
    lent. A buffer that is lent when the image is cut short (an error) is never reused; dropped, its pages keep
    their bytes for as long as the pipe holds them."""

    def __init__(self, fd: int, total: int, reuse: Callable[[Any], None]):
        self.fd = fd
        self.reuse = reuse
        capacity = pipe_bytes(fd) if _vmsplice is not None else None
        self.capacity = capacity or 0
        self.splice_until = total - capacity if capacity else 0  # bytes before this may be lent
        self.pos = 0  # bytes written or lent so far
        self.lent_bytes = 0
        self._lent_end = 0  # where the last piece lent ends
        self._lent: collections.deque = collections.deque()  # (position, buffers reusable once it is read)

    def write(self, pieces: Sequence[Tuple[memoryview, Optional[int]]], done_with: Sequence[Any] = ()) -> None:
        """Write these (view, address of its first byte in a caller's buffer, or None) pieces in order; the buffers
        in `done_with` are not needed after them."""
        n = sum(len(v) for v, _a in pieces)
        if self.pos + n <= self.splice_until and all(a is not None for _v, a in pieces):
            self._splice([(a, len(v)) for v, a in pieces])
            self.lent_bytes += n
            self.pos += n
            self._lent_end = self.pos
        else:
            writev_all(self.fd, [v for v, _a in pieces])
            self.pos += n
        if done_with and not self.lent_bytes:
            for buf in done_with:
                self.reuse(buf)
        elif done_with:
            # any piece of these buffers lent so far ends by the last piece lent: reused once that one is read
            self._lent.append((self._lent_end, list(done_with)))
        while self._lent and self._lent[0][0] <= self.pos - self.capacity:
            for buf in self._lent.popleft()[1]:
                self.reuse(buf)

    def _splice(self, iovs: List[Tuple[int, int]]) -> None:
        i = 0
        while i < len(iovs):
            batch = iovs[i:i + IOV_BATCH]
            got = _vmsplice(self.fd, (_IOVec * len(batch))(*batch), len(batch), 0)
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, os.strerror(err))
            while i < len(iovs) and got >= iovs[i][1]:
                got -= iovs[i][1]
                i += 1
            if got:
                iovs[i] = (iovs[i][0] + got, iovs[i][1] - got)
