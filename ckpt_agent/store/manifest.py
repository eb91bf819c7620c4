"""The manifest of a checkpoint generation: what it holds, written and read here only.

A manifest lists the CRIU images and captured files of one generation, each as chunk references
([digest hex, raw size, codec]), plus the facts of the checkpoint (job, step, when, why, where, statistics).
On disk (format 2) it is one JSON object, keys sorted, no spaces, inside an envelope:

    {"manifest": {...}, "signature": "<HMAC-SHA256 hex of the manifest's own JSON>"}   (no "signature" without a key)

`encode` serialises and signs (the store's Signer); `decode` checks the signature, the format and the shape
(`parse`) and returns the dataclasses; anything else is a DamagedCheckpointError with one line naming the file and
what is wrong. Readers use the dataclasses' attributes; nothing outside this module touches the JSON keys.
Keys this version does not know are kept (`extra`), so an entry read and written again stays the same.

Format 1 differs only in that images are never slices of chunks; format 2 images may be (store/pagedelta.py:
`slices` [chunk index, offset, length] inline, a `pagetable` of page hashes, `delta_depth`). Format 3 stores an
image's slices in chunks of their own (`slicetable`: count and chunks, 12 bytes a slice, like the page tables):
inline, a delta of a 500 GiB job after a 5% random change would list ~13 million slices, ~300 MB of JSON, more than
a reader accepts and parsed before every dump. A manifest's size is then linear in its chunks only (~85 bytes per
MiB of image). Format 4 is format 3 with the chunks it writes named by BLAKE3 instead of sha256 (store/chunks.py:
the chunks it shares with older generations keep their sha256 names). Each reader reads the formats before its own;
older agents pass over a newer format (NewerFormatError) rather than take BLAKE3-named chunks for damaged ones.
"""

from __future__ import annotations

import array
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

from ckpt_agent.errors import DamagedCheckpointError, NewerFormatError, StoreError
from ckpt_agent.store import layout
from ckpt_agent.store.chunks import CHUNK_BYTES, ChunkRef, WriteStats

if TYPE_CHECKING:
    from ckpt_agent.store.generations import Signer

# 4: chunks named by BLAKE3; 3: slices in chunks (slicetable); 2: slices inline; older agents refuse a newer format
FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, FORMAT_VERSION)
# read bound: a manifest lists ~85 bytes per MiB of image (1 MiB for 12 GiB), so 256 MiB covers 3 TiB of memory
MAX_MANIFEST_BYTES = 256 << 20
PAGE_TABLE_ENTRY_BYTES = 24  # one page of a page table: vaddr (8) and hash (16), pagedelta._ENTRY
SLICE_BYTES = 12  # one slice of a slice table: chunk index, offset, length, 32-bit little-endian words
FILE_KINDS = ("dir", "file", "symlink")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}\Z")


def canonical_json(value: Any) -> bytes:
    """The bytes a manifest (and its envelope) is stored and signed as."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _refs_json(refs: List[ChunkRef]) -> List[list]:
    return [r.to_json() for r in refs]


def _refs(value: List[list]) -> List[ChunkRef]:
    return [ChunkRef.from_json(r) for r in value]


def _known(cls: type) -> frozenset:
    return frozenset(f.name for f in fields(cls) if f.name != "extra")


# --- the dataclasses ----------------------------------------------------------------------------------------------
_WORD = "I" if array.array("I").itemsize == 4 else "L"  # a 32-bit unsigned word


class Slices:
    """An image's [chunk index, offset, length] pieces, in file order, three 32-bit words each (4 bytes a number
    instead of ~30 as Python lists: a delta of a large job holds millions). Iterates and indexes as tuples."""

    __slots__ = ("words",)

    def __init__(self, words: Optional[array.array] = None):
        self.words = words if words is not None else array.array(_WORD)

    @classmethod
    def of(cls, pieces: Any) -> Slices:
        """From [chunk index, offset, length] sequences (a format 2 manifest's inline slices, a test's lists)."""
        if isinstance(pieces, Slices):
            return pieces
        words = array.array(_WORD)
        for piece in pieces:
            words.extend(piece)
        return cls(words)

    def append(self, idx: int, off: int, length: int) -> None:
        self.words.extend((idx, off, length))

    def __len__(self) -> int:
        return len(self.words) // 3

    def __getitem__(self, k: int) -> tuple:
        if k < 0:
            k += len(self)
        if not 0 <= k < len(self):
            raise IndexError(k)
        w = self.words
        return w[3 * k], w[3 * k + 1], w[3 * k + 2]

    def __iter__(self) -> Iterator[tuple]:
        w = self.words
        return zip(w[0::3], w[1::3], w[2::3])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Slices):
            return self.words == other.words
        try:
            return list(self) == [tuple(p) for p in other]  # type: ignore[attr-defined]
        except TypeError:
            return NotImplemented

    def __repr__(self) -> str:
        return f"Slices({[list(p) for p in self][:8]}{'...' if len(self) > 8 else ''}, n={len(self)})"

    def to_json(self) -> List[List[int]]:
        return [list(p) for p in self]

    def to_bytes(self) -> bytes:
        if sys.byteorder == "little":
            return self.words.tobytes()
        swapped = array.array(_WORD, self.words)
        swapped.byteswap()
        return swapped.tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> Slices:
        if len(blob) % SLICE_BYTES:
            raise ValueError(f"{len(blob)} bytes are not whole slices")
        words = array.array(_WORD)
        words.frombytes(blob)
        if sys.byteorder != "little":
            words.byteswap()
        return cls(words)


@dataclass
class SliceTable:
    """Where an image's slices are stored (format 3): `count` slices of SLICE_BYTES in these chunks."""

    count: int
    chunks: List[ChunkRef]
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {**self.extra, "count": self.count, "chunks": _refs_json(self.chunks)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> SliceTable:
        return cls(count=d["count"], chunks=_refs(d["chunks"]),
                   extra={k: v for k, v in d.items() if k not in _known(cls)})


@dataclass
class PageTable:
    """(vaddr, hash) of every page of a pages image, stored as chunks: what the next generation's delta compares."""

    hash: Optional[str]  # which page hash (pagedelta.PAGE_HASH); a table of another is not compared with
    pages: int
    chunks: List[ChunkRef]
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        d = {**self.extra, "pages": self.pages, "chunks": _refs_json(self.chunks)}
        if self.hash is not None:
            d["hash"] = self.hash
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> PageTable:
        return cls(hash=d.get("hash"), pages=d["pages"], chunks=_refs(d["chunks"]),
                   extra={k: v for k, v in d.items() if k not in _known(cls)})


@dataclass
class ImageEntry:
    """A CRIU image: its chunks in file order, or (a delta) slices [chunk index, offset, length] of its chunks.

    The slices of a format 3 entry are stored in chunks (`slice_table`); `slices` is None until they are read
    (pagedelta.load_slices), and `pieces()` refuses to guess before. Entries of format 2 carry them inline."""

    name: str
    size: int
    chunks: List[ChunkRef]
    slices: Optional[Slices] = None
    pagetable: Optional[PageTable] = None
    delta_depth: Optional[int] = None  # generations since the image was last written in full
    slice_table: Optional[SliceTable] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slices is not None and not isinstance(self.slices, Slices):
            self.slices = Slices.of(self.slices)

    def pieces(self) -> Any:
        """(chunk index, offset in chunk, length) of the image in file order: its slices, or its whole chunks."""
        if self.slices is not None:
            return self.slices
        if self.slice_table is not None:
            raise RuntimeError(f"image {self.name}: its slices are not read yet (pagedelta.load_slices)")
        return [(i, 0, r.size) for i, r in enumerate(self.chunks)]

    def to_json(self) -> Dict[str, Any]:
        d = {**self.extra, "name": self.name, "size": self.size, "chunks": _refs_json(self.chunks)}
        if self.slice_table is not None:
            d["slicetable"] = self.slice_table.to_json()
        elif self.slices is not None:  # a format 2 entry, read and written again
            d["slices"] = self.slices.to_json()
        if self.pagetable is not None:
            d["pagetable"] = self.pagetable.to_json()
        if self.delta_depth is not None:
            d["delta_depth"] = self.delta_depth
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> ImageEntry:
        table, stable = d.get("pagetable"), d.get("slicetable")
        slices = d.get("slices")
        return cls(name=d["name"], size=d["size"], chunks=_refs(d["chunks"]),
                   slices=Slices.of(slices) if slices is not None else None,
                   pagetable=PageTable.from_json(table) if isinstance(table, dict) else None,
                   slice_table=SliceTable.from_json(stable) if isinstance(stable, dict) else None,
                   delta_depth=d.get("delta_depth"),
                   extra={k: v for k, v in d.items() if k not in _known(cls) and k not in ("slicetable",)})


@dataclass
class FileEntry:
    """A captured file, directory or symbolic link (checkpoint/capture.py takes and puts them back)."""

    path: str
    kind: str  # "dir" | "file" | "symlink"
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    ino: int = 0
    ctime_ns: int = 0
    target: str = ""
    chunks: Optional[List[ChunkRef]] = None

    def to_json(self) -> dict:
        d = {
            "path": self.path, "kind": self.kind, "mode": self.mode, "uid": self.uid, "gid": self.gid,
            "mtime_ns": self.mtime_ns,
        }
        if self.kind == "file":
            d.update(size=self.size, ino=self.ino, ctime_ns=self.ctime_ns, chunks=_refs_json(self.chunks or []))
        if self.kind == "symlink":
            d["target"] = self.target
        return d

    @classmethod
    def from_json(cls, d: dict) -> FileEntry:
        return cls(
            path=d["path"], kind=d["kind"], mode=d["mode"], uid=d["uid"], gid=d["gid"], mtime_ns=d["mtime_ns"],
            size=d.get("size", 0), ino=d.get("ino", 0), ctime_ns=d.get("ctime_ns", 0), target=d.get("target", ""),
            chunks=_refs(d.get("chunks", [])) if d["kind"] == "file" else None,
        )


STAT_COUNTERS = tuple(f.name for f in fields(WriteStats))


@dataclass
class Stats(WriteStats):
    """What a checkpoint read and wrote (its WriteStats counters) and where its time went (`seconds`:
    frozen_seconds, prepare_seconds, dump_seconds, ... as the engine measured them)."""

    seconds: Dict[str, float] = field(default_factory=dict)
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {**self.extra, **{k: getattr(self, k) for k in STAT_COUNTERS}, **self.seconds}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> Stats:
        counters = {k: d[k] for k in STAT_COUNTERS if type(d.get(k)) is int}
        seconds = {k: v for k, v in d.items()
                   if k.endswith("_seconds") and type(v) in (int, float) and k not in STAT_COUNTERS}
        extra = {k: v for k, v in d.items() if k not in counters and k not in seconds}
        return cls(**counters, seconds=seconds, extra=extra)


@dataclass
class Summary:
    """The few facts `ckpt list` shows of a generation (summary.json, written before the manifest)."""

    generation: int
    created: str
    final: bool
    reason: str
    node: str
    bytes_in: int
    bytes_written: int

    def to_json(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, d: Any) -> Optional[Summary]:
        """None when `d` is not a well-formed summary (the manifest is then read instead)."""
        if not isinstance(d, dict):
            return None
        types = {"generation": int, "created": str, "final": bool, "reason": str, "node": str, "bytes_in": int,
                 "bytes_written": int}
        if not all(isinstance(d.get(k), t) for k, t in types.items()):
            return None
        return cls(**{k: d[k] for k in types})


@dataclass
class Manifest:
    format: int
    created: str  # ISO UTC with microseconds, generations.iso
    images: List[ImageEntry]
    files: List[FileEntry]
    job_id: str = ""
    step: str = ""
    generation: int = 0
    final: bool = False
    reason: str = ""
    machine: Dict[str, Any] = field(default_factory=dict)  # criu_version, kernel, arch, cpu_model, host
    node: str = ""
    instance: Dict[str, Any] = field(default_factory=dict)  # instance id, type, zone as the agent knows them
    cwd: Optional[str] = None
    argv: List[str] = field(default_factory=list)
    uid: Optional[int] = None  # None only in a manifest that does not say (a restore for a user refuses it)
    gid: Optional[int] = None
    pipes: Dict[str, int] = field(default_factory=dict)  # "stdout"/"stderr"/"status" -> inode of the dumped pipe
    stats: Stats = field(default_factory=Stats)
    extra: Dict[str, Any] = field(default_factory=dict)

    def refs(self) -> Iterator[ChunkRef]:
        """Every chunk the generation needs kept: its images', their page tables' and its files'."""
        for img in self.images:
            yield from img.chunks
            if img.pagetable is not None:  # what the next generation's page-granular delta compares with
                yield from img.pagetable.chunks
            if img.slice_table is not None:
                yield from img.slice_table.chunks
        for f in self.files:
            yield from f.chunks or ()

    def image_bytes(self) -> int:
        return sum(img.size for img in self.images)

    def summary(self) -> Summary:
        return Summary(generation=self.generation, created=self.created, final=self.final, reason=self.reason,
                       node=self.node, bytes_in=self.stats.bytes_in, bytes_written=self.stats.bytes_written)

    def to_json(self) -> Dict[str, Any]:
        d = {**self.extra, "format": self.format, "job_id": self.job_id, "step": self.step,
             "generation": self.generation, "created": self.created, "final": self.final, "reason": self.reason,
             "machine": self.machine, "node": self.node, "instance": self.instance, "argv": self.argv,
             "pipes": self.pipes, "images": [i.to_json() for i in self.images],
             "files": [f.to_json() for f in self.files], "stats": self.stats.to_json()}
        for key in ("cwd", "uid", "gid"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> Manifest:
        """From a dict `check` accepted."""
        optional = {k: d[k] for k in _OPTIONAL if k in d}
        stats = d.get("stats")
        return cls(format=d["format"], created=d["created"], images=[ImageEntry.from_json(i) for i in d["images"]],
                   files=[FileEntry.from_json(f) for f in d["files"]],
                   stats=Stats.from_json(stats) if isinstance(stats, dict) else Stats(),
                   extra={k: v for k, v in d.items() if k not in _known(cls)}, **optional)


# optional top-level keys and the type each must have when present
_OPTIONAL = {"job_id": str, "step": str, "generation": int, "final": bool, "reason": str, "machine": dict,
             "node": str, "instance": dict, "cwd": str, "argv": list, "uid": int, "gid": int, "pipes": dict}


# --- writing and reading -------------------------------------------------------------------------------------------
def encode(manifest: Manifest, signer: Signer) -> bytes:
    """The manifest file's bytes: the envelope with the manifest and, where the signer holds a key, its signature."""
    body = manifest.to_json()
    signature = signer.sign(canonical_json(body))
    data = canonical_json({"manifest": body, "signature": signature} if signature else {"manifest": body})
    if len(data) > MAX_MANIFEST_BYTES:  # committed, it would read as damaged: the checkpoint fails here instead
        raise StoreError(f"the manifest of job {manifest.job_id} step {manifest.step} generation "
                         f"{manifest.generation} takes {len(data)} bytes, more than a reader accepts "
                         f"({MAX_MANIFEST_BYTES}); not committed")
    return data


def decode(raw: bytes, where: str, signer: Signer, require_signature: bool = False) -> Manifest:
    """The manifest in a manifest file's bytes, checked: signed (whenever `signer` holds a key, and always when
    `require_signature`), of a readable format and shape. DamagedCheckpointError naming `where` otherwise."""
    try:
        envelope = json.loads(raw)
        body = envelope["manifest"]
        if not isinstance(body, dict):
            raise TypeError("the manifest is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise DamagedCheckpointError(f"{where}: manifest is unreadable ({e})") from e
    signer.verify(canonical_json(body), envelope.get("signature"), where, require_signature)
    return parse(body, where)


def parse(body: Dict[str, Any], where: str) -> Manifest:
    """A manifest's JSON object as dataclasses, after `check`."""
    fmt = body.get("format")
    if type(fmt) is int and fmt > FORMAT_VERSION:
        raise NewerFormatError(f"{where}: unsupported manifest format {fmt} (this agent reads formats up to "
                               f"{FORMAT_VERSION}: a newer agent wrote it)")
    if fmt not in READABLE_FORMATS or type(fmt) is not int:
        raise DamagedCheckpointError(f"{where}: unsupported manifest format {fmt!r}")
    check(body, where)
    return Manifest.from_json(body)


def _check_refs(refs: Any, where: str) -> int:
    """Chunk references as stored ([digest hex, raw size, codec]); returns their total size."""
    if not isinstance(refs, list):
        raise DamagedCheckpointError(f"{where}: malformed manifest: a chunk list is not a list")
    total = 0
    for r in refs:
        if not (type(r) is list and len(r) == 3 and type(r[1]) is int and 0 < r[1] <= CHUNK_BYTES
                and r[2] in layout.CODEC_SUFFIXES and type(r[0]) is str and _DIGEST_RE.match(r[0])):
            raise DamagedCheckpointError(f"{where}: malformed manifest: bad chunk reference {str(r)[:100]}")
        total += r[1]
    return total


def _check_slices(slices: Any, refs: List[list]) -> Optional[int]:
    """Total length of an image's [chunk index, offset, length] slices, None when one leaves its chunk."""
    if not isinstance(slices, list):
        return None
    total = 0
    for s in slices:
        if not (type(s) is list and len(s) == 3 and all(type(x) is int for x in s) and 0 <= s[0] < len(refs)
                and s[1] >= 0 and s[2] > 0 and s[1] + s[2] <= refs[s[0]][1]):
            return None
        total += s[2]
    return total


def check_loaded_slices(entry: ImageEntry, slices: Slices, where: str) -> None:
    """Slices read from an entry's slice table, against the entry: each inside its chunk, the lengths adding up to
    the image's size. C-speed passes over the words (a large delta holds millions of slices)."""
    def bad(what: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"{where}: image {entry.name}: bad slice table: {what}")

    if entry.slice_table is None or len(slices) != entry.slice_table.count:
        raise bad("it does not hold the slices it counts")
    if not slices:
        raise bad("no slices")
    w = slices.words
    indexes, offsets, lengths = w[0::3], w[1::3], w[2::3]
    if max(indexes) >= len(entry.chunks) or min(lengths) == 0:
        raise bad("a slice names no chunk or is empty")
    sizes = [r.size for r in entry.chunks]
    ends = map(int.__add__, offsets, lengths)
    if not all(map(int.__le__, ends, map(sizes.__getitem__, indexes))):
        raise bad("a slice leaves its chunk")
    if sum(lengths) != entry.size:
        raise bad("its slices and the image's size disagree")


def check(manifest: Dict[str, Any], where: str) -> None:
    """The shape every reader relies on; anything else is a damaged generation (never a KeyError later).
    Messages are built only on failure: a manifest of a large process lists ~12,000 chunks per 12 GiB."""
    def bad(what: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"{where}: malformed manifest: {what}")

    if not isinstance(manifest.get("created"), str):
        raise bad("'created' is missing or not a string")
    images, files = manifest.get("images"), manifest.get("files")
    if not isinstance(images, list):
        raise bad("'images' is missing or not a list")
    if not isinstance(files, list):
        raise bad("'files' is missing or not a list")
    for img in images:
        if not (isinstance(img, dict) and isinstance(img.get("name"), str) and _IMAGE_NAME_RE.match(img["name"])
                and type(img.get("size")) is int):
            raise bad(f"bad image entry {str(img)[:100]}")
        total = _check_refs(img.get("chunks"), where)
        if "slicetable" in img:  # its slices are checked where they are read (pagedelta.load_slices)
            stable = img["slicetable"]
            if "slices" in img or not (isinstance(stable, dict) and type(stable.get("count")) is int
                                       and stable["count"] > 0 and _check_refs(stable.get("chunks"), where)
                                       == SLICE_BYTES * stable["count"]):
                raise bad(f"image {img['name']}: bad slice table")
            total = img["size"]
        elif "slices" in img:
            total = _check_slices(img["slices"], img["chunks"])
            if total is None:
                raise bad(f"image {img['name']}: bad slices")
        if total != img["size"]:
            raise bad(f"image {img['name']}: size and chunks disagree")
        table = img.get("pagetable")
        if table is not None and not (isinstance(table, dict) and type(table.get("pages")) is int
                                      and _check_refs(table.get("chunks"), where)
                                      == PAGE_TABLE_ENTRY_BYTES * table["pages"]):
            raise bad(f"image {img['name']}: bad page table")
        if "delta_depth" in img and type(img["delta_depth"]) is not int:
            raise bad(f"image {img['name']}: 'delta_depth' is not a whole number")
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and f.get("kind") in FILE_KINDS
                and all(type(f.get(k)) is int for k in ("mode", "uid", "gid", "mtime_ns"))):
            raise bad(f"bad file entry {str(f)[:100]}")
        path = f["path"]
        if not (path.startswith("/") and os.path.normpath(path) == path and "\0" not in path):
            raise bad(f"file path {path[:100]!r} is not absolute and normal")
        if f["kind"] == "file" and not (type(f.get("size")) is int
                                        and _check_refs(f.get("chunks"), where) == f["size"]):
            raise bad(f"file {path[:100]}: size and chunks disagree")
        if f["kind"] == "symlink" and not (isinstance(f.get("target"), str) and "\0" not in f["target"]):
            raise bad(f"symlink {path[:100]}: bad target")
    for key, kind in _OPTIONAL.items():
        if key in manifest and not (type(manifest[key]) is kind if kind in (int, bool) else
                                    isinstance(manifest[key], kind)):
            raise bad(f"'{key}' is not {_TYPE_WORDS[kind]}")
    if not all(isinstance(k, str) and type(v) is int for k, v in manifest.get("pipes", {}).items()):
        raise bad("'pipes' does not map names to inode numbers")
    if "stats" in manifest and not isinstance(manifest["stats"], dict):
        raise bad("'stats' is not a mapping")


_TYPE_WORDS = {str: "a string", int: "a whole number", bool: "true or false", dict: "a mapping", list: "a list"}
