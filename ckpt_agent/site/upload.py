"""The bootstrap bundle: what every node downloads in OnNodeConfigured, built locally and uploaded to S3.

Contract:
- `build_bundle(site, site_path, render_dir, out_dir, wheel=None)` fills `out_dir` with
      on-node-configured.sh, install-criu.sh       the bootstrap scripts
      patches/criu-<version>/*.patch               the CRIU patches install-criu.sh applies (beside it, as it expects)
      wheels/ckpt_agent-<version>-py3-none-any.whl the agent (built here unless `wheel` is given)
      wheels/*.whl                                 the wheelhouse: the agent's node dependencies (PyYAML, zstandard)
                                                   for every supported (Python, architecture) pair, and boto3 for the
                                                   head node, so nodes install with `pip --no-index` and never need
                                                   a package index (private and air-gapped subnets)
      criu/<tarball>                               the CRIU source, when the site names a local file
      cluster.yaml, head/..., nodes/<queue>/..., systemd/...   the rendered files from `render_dir`
      SHA256SUMS                                    every file above; nodes fetch and verify through it
  and returns the relative paths.
- `bundle_version(site, node_files, wheel=None)` is the content hash that versions the bundle's S3 prefix
  (`<prefix>/b-<hash>`): every input of the bundle except third-party wheels, which are pinned to the versions
  installed here. A changed bundle gets a new key, so the rendered cluster.yaml changes and `pcluster
  update-cluster` sees it; an unchanged one keeps its key.
- `build_wheel(dest)` builds the installed ckpt-agent as a pure-Python wheel with the standard library only: no
  network, no build backend, byte-identical for identical sources.
- `S3Bundle(bucket, prefix, client)` uploads a built bundle; AWS failures become one-line AwsError (exit 80).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from ckpt_agent import PACKAGE_DIR
from ckpt_agent.adapters.aws import aws_call, region_of
from ckpt_agent.errors import CommandError, ConfigError
from ckpt_agent.site.render import SCRIPT_NAME
from ckpt_agent.util import proc

BOOTSTRAP_FILES = (SCRIPT_NAME, "install-criu.sh")
PATCHES_DIR = "patches"  # bootstrap/patches/criu-<version>/, shipped beside install-criu.sh
DIST_NAME = "ckpt-agent"
# What a node's venv needs beyond the agent: the core dependencies (compute and head), and the `aws` extra (boto3,
# for `ckpt prices --update` and `ckpt report --cloudwatch`) on the head node only. Jinja2 stays on the machine
# that renders and uploads.
NODE_PACKAGES = ("PyYAML", "zstandard", "xxhash", "blake3")
HEAD_PACKAGES = ("boto3",)
# pip platform tags per architecture: manylinux2014 (glibc 2.17) covers every OS ParallelCluster supports.
PLATFORM_TAGS = {
    "x86_64": ("manylinux2014_x86_64", "manylinux_2_28_x86_64"),
    "aarch64": ("manylinux2014_aarch64", "manylinux_2_28_aarch64"),
}
PIP_DOWNLOAD_TIMEOUT_SECONDS = 600
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same wheel bytes


def bootstrap_dir() -> Path:
    """$CKPT_BOOTSTRAP_DIR, else `ckpt_agent/bootstrap` (package data), else the repository's bootstrap/."""
    package = PACKAGE_DIR
    candidates = [Path(os.environ["CKPT_BOOTSTRAP_DIR"])] if os.environ.get("CKPT_BOOTSTRAP_DIR") else []
    candidates += [package / "bootstrap", package.parent / "bootstrap"]
    for cand in candidates:
        if all((cand / name).is_file() for name in BOOTSTRAP_FILES):
            return cand
    raise ConfigError(f"bootstrap scripts not found (looked in {', '.join(map(str, candidates))})")


def pinned(names: Iterable[str]) -> List[str]:
    """`name==version` for each package as installed here: the wheelhouse is what the tests ran against, and the
    bundle's content hash can name it without downloading anything."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError as e:
            raise ConfigError(f"{name} is not installed here: install ckpt-agent with its [admin] extra "
                              "(pip install 'ckpt-agent[admin]') to build bundles") from e
    return out


def requirements_of(names: Iterable[str]) -> List[str]:
    """The agent's own requirement for each package (e.g. `PyYAML>=5.4`, `boto3>=1.28` of an extra), from its
    installed metadata."""
    wanted = {n.lower() for n in names}
    found: Dict[str, str] = {}
    for req in importlib.metadata.requires(DIST_NAME) or []:
        spec = req.split(";")[0].strip()
        name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0]
        if name.lower() in wanted:
            found.setdefault(name.lower(), spec.replace(" ", ""))
    return list(found.values()) or list(names)


def _download_pinned(download: Downloader, dest: Path, names: Tuple[str, ...], python: str,
                     platforms: Tuple[str, ...]) -> None:
    """The versions installed here; where they have no wheel for `python` (too new for 3.9, say), the newest that
    has, within the agent's own requirements."""
    try:
        download(dest, pinned(names), python, platforms)
    except ConfigError:
        download(dest, requirements_of(names), python, platforms)


def _pip_download(dest: Path, requirements: List[str], python: str, platforms: Tuple[str, ...]) -> None:
    """Binary wheels of `requirements` and their dependencies for one (Python, platform) into `dest`."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
            "--dest", str(dest), "--python-version", python]
    for tag in platforms:
        argv += ["--platform", tag]
    try:
        proc.run(argv + requirements, timeout=PIP_DOWNLOAD_TIMEOUT_SECONDS)
    except CommandError as e:
        detail = (e.stderr or "").strip().splitlines()
        raise ConfigError(f"cannot download wheels of {' '.join(requirements)} for Python {python} on "
                          f"{'/'.join(platforms)}: {detail[-1] if detail else e}") from e


Downloader = Callable[[Path, List[str], str, Tuple[str, ...]], None]


def build_wheelhouse(dest: Path, pythons: Iterable[str], architectures: Iterable[str],
                     download: Downloader = _pip_download) -> List[str]:
    """Download every wheel a node installs into `dest` (flat: pip picks by tags). Returns the wheel names."""
    dest.mkdir(parents=True, exist_ok=True)
    pythons = list(pythons)
    for arch in architectures:
        for python in pythons:
            _download_pinned(download, dest, NODE_PACKAGES, python, PLATFORM_TAGS[arch])
    # boto3 and its dependencies are pure Python: one download, for the oldest Python, serves them all.
    oldest = min(pythons, key=lambda v: tuple(map(int, v.split("."))))
    _download_pinned(download, dest, HEAD_PACKAGES, oldest, ("any",))
    return sorted(p.name for p in dest.glob("*.whl"))


def bootstrap_sources(criu_version: str) -> Dict[str, Path]:
    """{bundle path: source file} of the bootstrap scripts and the CRIU patches for `criu_version`."""
    scripts = bootstrap_dir()
    out = {name: scripts / name for name in BOOTSTRAP_FILES}
    patches = scripts / PATCHES_DIR / f"criu-{criu_version}"
    if patches.is_dir():
        for patch in sorted(patches.glob("*.patch")):
            out[f"{PATCHES_DIR}/criu-{criu_version}/{patch.name}"] = patch
    return out


def _local_criu_source(site: Dict[str, Any], site_path: str) -> Optional[Path]:
    source = site["criu"].get("source") or ""
    if not source or "://" in source:
        return None
    local = Path(site_path).resolve().parent / source if not os.path.isabs(source) else Path(source)
    if not local.is_file():
        raise ConfigError(
            f"{site_path}: criu.source: {local} does not exist (download the CRIU {site['criu']['version']} "
            "release tarball there, or give an https:// or s3:// URL)"
        )
    return local


def _checked_wheel(wheel: str) -> Path:
    if not Path(wheel).is_file() or not Path(wheel).name.startswith("ckpt_agent-"):
        raise ConfigError(f"{wheel}: not a ckpt_agent wheel")
    return Path(wheel)


def bundle_version(site: Dict[str, Any], node_files: Dict[str, str], wheel: Optional[str] = None) -> str:
    """`b-<12 hex>`: a hash of everything the bundle carries (see the module docstring)."""
    h = hashlib.sha256()

    def add(name: str, data: bytes) -> None:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)

    for rel, text in sorted(node_files.items()):
        add(f"rendered/{rel}", text.encode())
    for rel, path in sorted(bootstrap_sources(site["criu"]["version"]).items()):
        add(rel, path.read_bytes())
    if wheel:
        add("wheel", _checked_wheel(wheel).read_bytes())
    else:
        with tempfile.TemporaryDirectory(prefix="ckpt-wheel-") as tmp:
            add("wheel", build_wheel(Path(tmp)).read_bytes())
    # The CRIU tarball is named by node.env (version, sha256, source), which is hashed above.
    b = site["bundle"]
    add("wheelhouse", " ".join(pinned(NODE_PACKAGES) + pinned(HEAD_PACKAGES) + list(b["pythons"])
                               + list(b["architectures"])).encode())
    return "b-" + h.hexdigest()[:12]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(dest: Path) -> Path:
    """A py3-none-any wheel of the installed package (its metadata, entry points and every package file)."""
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError as e:
        raise ConfigError(f"{DIST_NAME} is not installed: run 'pip install -e .' or pass --wheel FILE") from e
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    if not metadata:
        raise ConfigError(f"{DIST_NAME}: installed without metadata; pass --wheel FILE")
    version = dist.version
    package = PACKAGE_DIR
    info = f"ckpt_agent-{version}.dist-info"
    entries: Dict[str, bytes] = {}
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            entries[f"ckpt_agent/{path.relative_to(package).as_posix()}"] = path.read_bytes()
    entries[f"{info}/METADATA"] = metadata.encode()
    entries[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: ckpt-agent\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    entry_points = dist.read_text("entry_points.txt")
    if entry_points:
        entries[f"{info}/entry_points.txt"] = entry_points.encode()
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries.items())
    record += f"{info}/RECORD,,\n"
    entries[f"{info}/RECORD"] = record.encode()
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"ckpt_agent-{version}-py3-none-any.whl"
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zi = zipfile.ZipInfo(name, ZIP_DATE)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
    os.replace(tmp, out)
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_bundle(
    site: Dict[str, Any], site_path: str, render_dir: str, out_dir: str, wheel: str | None = None,
    download: Downloader = _pip_download,
) -> List[str]:
    """Assemble the bundle in `out_dir` (emptied first); return its files, SHA256SUMS last."""
    local = _local_criu_source(site, site_path)  # a missing file is reported before any download
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for rel, src in bootstrap_sources(site["criu"]["version"]).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
        os.chmod(out / rel, 0o755 if rel in BOOTSTRAP_FILES else 0o644)
    if wheel:
        _checked_wheel(wheel)
        (out / "wheels").mkdir()
        shutil.copyfile(wheel, out / "wheels" / Path(wheel).name)
    else:
        build_wheel(out / "wheels")
    build_wheelhouse(out / "wheels", site["bundle"]["pythons"], site["bundle"]["architectures"], download)
    if local is not None:
        (out / "criu").mkdir()
        shutil.copyfile(local, out / "criu" / local.name)
    rendered = Path(render_dir)
    for path in sorted(rendered.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.relative_to(rendered).parts[0] != "iam":
            rel = path.relative_to(rendered)
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / rel)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    with open(out / "SHA256SUMS", "w", encoding="utf-8") as fh:
        for rel in files:
            fh.write(f"{_sha256_file(out / rel)}  {rel}\n")
    return files + ["SHA256SUMS"]


class S3Bundle:
    """Uploads a bundle directory to s3://bucket/prefix/ with a boto3 S3 client."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client

    def uri(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}/{rel}" if rel else f"s3://{self.bucket}/{self.prefix}"

    def upload(self, bundle_dir: str, files: List[str]) -> None:
        """Upload every file, SHA256SUMS last so that nodes never see a manifest naming missing files."""
        missing = f"bucket {self.bucket} does not exist (create it, or fix bundle.bucket)"
        denied = "the current AWS credentials cannot write there"
        hints = {"404": missing, "NoSuchBucket": missing, "403": denied, "AccessDenied": denied}
        region = region_of(self.client)
        with aws_call("S3", "HeadBucket", region=region, subject=self.uri(), hints=hints):
            self.client.head_bucket(Bucket=self.bucket)
        ordered = [f for f in files if f != "SHA256SUMS"] + [f for f in files if f == "SHA256SUMS"]
        for rel in ordered:
            where = self.uri(rel)
            try:
                with open(os.path.join(bundle_dir, rel), "rb") as fh, \
                        aws_call("S3", "PutObject", region=region, subject=where, hints=hints):
                    self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}", Body=fh)
            except OSError as e:
                raise ConfigError(f"{where}: cannot read the bundle file: {e.strerror}") from e
