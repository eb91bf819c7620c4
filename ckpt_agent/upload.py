"""The bootstrap bundle: what every node downloads in OnNodeConfigured, built locally and uploaded to S3.

Contract:
- `build_bundle(site, site_path, render_dir, out_dir, wheel=None)` fills `out_dir` with
      on-node-configured.sh, install-criu.sh       the bootstrap scripts
      wheels/ckpt_agent-<version>-py3-none-any.whl the agent (built here unless `wheel` is given)
      criu/<tarball>                               the CRIU source, when the site names a local file
      cluster.yaml, head/..., nodes/<queue>/..., systemd/...   the rendered files from `render_dir`
      SHA256SUMS                                    every file above; nodes fetch and verify through it
  and returns the relative paths.
- `build_wheel(dest)` builds the installed ckpt-agent as a pure-Python wheel with the standard library only: no
  network, no build backend, byte-identical for identical sources.
- `S3Bundle(bucket, prefix, client)` uploads a built bundle; AWS failures become one-line AwsError (exit 80).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List

from .errors import AwsError, ConfigError
from .render import SCRIPT_NAME

BOOTSTRAP_FILES = (SCRIPT_NAME, "install-criu.sh")
DIST_NAME = "ckpt-agent"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same sources give the same wheel bytes


def bootstrap_dir() -> Path:
    """$CKPT_BOOTSTRAP_DIR, else `ckpt_agent/bootstrap` (package data), else the repository's bootstrap/."""
    package = Path(__file__).resolve().parent
    candidates = [Path(os.environ["CKPT_BOOTSTRAP_DIR"])] if os.environ.get("CKPT_BOOTSTRAP_DIR") else []
    candidates += [package / "bootstrap", package.parent / "bootstrap"]
    for cand in candidates:
        if all((cand / name).is_file() for name in BOOTSTRAP_FILES):
            return cand
    raise ConfigError(f"bootstrap scripts not found (looked in {', '.join(map(str, candidates))})")


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
    package = Path(__file__).resolve().parent
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
    site: Dict[str, Any], site_path: str, render_dir: str, out_dir: str, wheel: str | None = None
) -> List[str]:
    """Assemble the bundle in `out_dir` (emptied first); return its files, SHA256SUMS last."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    scripts = bootstrap_dir()
    for name in BOOTSTRAP_FILES:
        shutil.copyfile(scripts / name, out / name)
        os.chmod(out / name, 0o755)
    if wheel:
        if not Path(wheel).is_file() or not Path(wheel).name.startswith("ckpt_agent-"):
            raise ConfigError(f"{wheel}: not a ckpt_agent wheel")
        (out / "wheels").mkdir()
        shutil.copyfile(wheel, out / "wheels" / Path(wheel).name)
    else:
        build_wheel(out / "wheels")
    source = site["criu"].get("source") or ""
    if source and "://" not in source:
        local = Path(site_path).resolve().parent / source if not os.path.isabs(source) else Path(source)
        if not local.is_file():
            raise ConfigError(
                f"{site_path}: criu.source: {local} does not exist (download the CRIU {site['criu']['version']} "
                "release tarball there, or give an https:// or s3:// URL)"
            )
        (out / "criu").mkdir()
        shutil.copyfile(local, out / "criu" / local.name)
    rendered = Path(render_dir)
    for path in sorted(rendered.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
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
        from botocore.exceptions import BotoCoreError, ClientError

        where = self.uri()
        try:
            self.client.head_bucket(Bucket=self.bucket)
            ordered = [f for f in files if f != "SHA256SUMS"] + [f for f in files if f == "SHA256SUMS"]
            for rel in ordered:
                where = self.uri(rel)
                with open(os.path.join(bundle_dir, rel), "rb") as fh:
                    self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}", Body=fh)
        except ClientError as e:
            err = e.response.get("Error", {})
            code, message = err.get("Code", "?"), err.get("Message", "")
            if code in ("404", "NoSuchBucket"):
                raise AwsError(f"{where}: bucket {self.bucket} does not exist (create it, or fix bundle.bucket)") from e
            if code in ("403", "AccessDenied"):
                raise AwsError(f"{where}: access denied: the current AWS credentials cannot write there") from e
            raise AwsError(f"{where}: upload failed: {code}: {message}".rstrip(": ")) from e
        except BotoCoreError as e:
            raise AwsError(f"{where}: upload failed: {e}") from e
        except OSError as e:
            raise ConfigError(f"{where}: cannot read the bundle file: {e.strerror}") from e
