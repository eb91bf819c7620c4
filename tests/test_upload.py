"""The bootstrap bundle and `ckpt upload` (S3 through moto)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ckpt_agent import cli, upload
from ckpt_agent.errors import EXIT_AWS, EXIT_CONFIG, EXIT_USAGE, ConfigError
from ckpt_agent.render import render_site, write_tree
from ckpt_agent.site import load_site

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
BUCKET, PREFIX = "my-eda-ckpt-bootstrap", "ckpt-agent/eda-spot"


@pytest.fixture()
def site_dir(tmp_path):
    """The example site file in a temporary directory, with a stand-in for the CRIU tarball it names."""
    d = tmp_path / "site"
    d.mkdir()
    shutil.copyfile(EXAMPLE, d / "site.yaml")
    (d / "criu_4.2.1.orig.tar.xz").write_bytes(b"not really criu")
    return d


@pytest.fixture()
def s3(monkeypatch):
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3
    from moto import mock_aws

    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


def test_wheel_is_valid_and_reproducible(tmp_path):
    first = upload.build_wheel(tmp_path / "a")
    second = upload.build_wheel(tmp_path / "b")
    assert first.name == second.name
    assert first.name.startswith("ckpt_agent-") and first.name.endswith("-py3-none-any.whl")
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        assert "ckpt_agent/yamlschema.py" in names and "ckpt_agent/cli.py" in names
        assert not [n for n in names if "__pycache__" in n]
        assert "ckpt = ckpt_agent.cli:main" in zf.read(f"{info}/entry_points.txt").decode()
        assert "Requires-Dist: PyYAML" in zf.read(f"{info}/METADATA").decode()
        for line in zf.read(f"{info}/RECORD").decode().splitlines():
            name, digest, size = line.rsplit(",", 2)
            if digest:
                data = zf.read(name)
                assert int(size) == len(data)
                assert digest == upload._record_hash(data)


def test_pip_installs_the_wheel(tmp_path):
    wheel = upload.build_wheel(tmp_path)
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check",
         "--target", str(target), str(wheel)],
        check=True, timeout=120,
    )
    assert (target / "ckpt_agent" / "site.py").is_file()
    assert (target / "bin" / "ckpt").is_file()


def test_bundle_contents_and_checksums(tmp_path, site_dir):
    site = load_site(str(site_dir / "site.yaml"))
    write_tree(str(tmp_path / "r"), render_site(site, "site.yaml"))
    files = upload.build_bundle(site, str(site_dir / "site.yaml"), str(tmp_path / "r"), str(tmp_path / "b"))
    assert files[-1] == "SHA256SUMS"
    for name in ("on-node-configured.sh", "install-criu.sh", "criu/criu_4.2.1.orig.tar.xz", "cluster.yaml",
                 "head/agent.yaml", "head/ckpt-gc.cron", "nodes/sim-spot/agent.yaml", "nodes/ondemand/node.env",
                 "systemd/ckpt-agent.service"):
        assert name in files
    assert [f for f in files if f.startswith("wheels/")][0].endswith("-py3-none-any.whl")
    sums = (tmp_path / "b" / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(files) - 1
    for line in sums:
        digest, rel = line.split("  ")
        assert hashlib.sha256((tmp_path / "b" / rel).read_bytes()).hexdigest() == digest
    assert (tmp_path / "b" / "on-node-configured.sh").stat().st_mode & 0o111


def test_bundle_needs_the_local_criu_tarball(tmp_path, site_dir):
    (site_dir / "criu_4.2.1.orig.tar.xz").unlink()
    site = load_site(str(site_dir / "site.yaml"))
    write_tree(str(tmp_path / "r"), render_site(site, "site.yaml"))
    with pytest.raises(ConfigError, match=r"criu.source: .*criu_4.2.1.orig.tar.xz does not exist"):
        upload.build_bundle(site, str(site_dir / "site.yaml"), str(tmp_path / "r"), str(tmp_path / "b"))


def test_upload_puts_the_bundle_in_s3_and_prints_the_command(s3, site_dir, tmp_path, capsys):
    s3.create_bucket(Bucket=BUCKET)
    render_dir = tmp_path / "rendered"
    rc = cli.main(["upload", str(site_dir / "site.yaml"), "--render-dir", str(render_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == (f"pcluster create-cluster --cluster-name eda-spot --region us-east-1 "
                   f"--cluster-configuration {render_dir}/cluster.yaml\n")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/")["Contents"]}
    assert len(keys) == 20  # docs/cluster-setup.md shows this count
    assert f"{PREFIX}/on-node-configured.sh" in keys and f"{PREFIX}/SHA256SUMS" in keys
    assert f"{PREFIX}/nodes/sim-spot-xl/agent.yaml" in keys and f"{PREFIX}/criu/criu_4.2.1.orig.tar.xz" in keys
    sums = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/SHA256SUMS")["Body"].read().decode().splitlines()
    assert {f"{PREFIX}/{line.split('  ')[1]}" for line in sums} | {f"{PREFIX}/SHA256SUMS"} == keys
    body = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/cluster.yaml")["Body"].read()
    assert body == (render_dir / "cluster.yaml").read_bytes()
    assert "uploaded" in err and f"s3://{BUCKET}/{PREFIX}/" in err


def test_upload_default_render_dir_is_next_to_the_site(s3, site_dir, capsys):
    s3.create_bucket(Bucket=BUCKET)
    assert cli.main(["upload", str(site_dir / "site.yaml")]) == 0
    assert (site_dir / "rendered" / "eda-spot" / "cluster.yaml").is_file()
    assert f"{site_dir}/rendered/eda-spot/cluster.yaml" in capsys.readouterr().out


def test_missing_bucket_is_one_line_and_exit_80(s3, site_dir, tmp_path, capsys):
    rc = cli.main(["upload", str(site_dir / "site.yaml"), "--render-dir", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == EXIT_AWS
    assert out == ""
    assert err.strip() == (f"ckpt: s3://{BUCKET}/{PREFIX}: bucket {BUCKET} does not exist "
                           "(create it, or fix bundle.bucket)")


def test_other_aws_errors_are_exit_80(site_dir, tmp_path):
    from botocore.exceptions import ClientError

    class Denied:
        def head_bucket(self, **kw):
            return {}

        def put_object(self, **kw):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "x").write_text("x")
    with pytest.raises(Exception) as e:
        upload.S3Bundle(BUCKET, PREFIX, Denied()).upload(str(bundle), ["x"])
    assert e.value.exit_code == EXIT_AWS
    assert str(e.value) == f"s3://{BUCKET}/{PREFIX}/x: access denied: the current AWS credentials cannot write there"


def test_upload_invalid_site_exits_2(tmp_path, capsys):
    bad = REPO / "tests" / "data" / "site" / "invalid.yaml"
    assert cli.main(["upload", str(bad), "--render-dir", str(tmp_path / "r")]) == EXIT_USAGE
    assert not (tmp_path / "r").exists()


def test_upload_with_a_given_wheel(s3, site_dir, tmp_path, capsys):
    s3.create_bucket(Bucket=BUCKET)
    not_wheel = tmp_path / "other.whl"
    not_wheel.write_bytes(b"x")
    assert cli.main(["upload", str(site_dir / "site.yaml"), "--wheel", str(not_wheel)]) == EXIT_CONFIG
    assert "not a ckpt_agent wheel" in capsys.readouterr().err


def test_upload_creates_the_clusters_dashboard(s3, site_dir, tmp_path, capsys):
    s3.create_bucket(Bucket=BUCKET)
    assert cli.main(["upload", str(site_dir / "site.yaml"), "--render-dir", str(tmp_path / "r")]) == 0
    assert "put CloudWatch dashboard ckpt-eda-spot in us-east-1" in capsys.readouterr().err
    import boto3

    cw = boto3.client("cloudwatch", region_name="us-east-1")
    body = json.loads(cw.get_dashboard(DashboardName="ckpt-eda-spot")["DashboardBody"])
    assert body == json.loads((tmp_path / "r" / "dashboard.json").read_text())
