"""The bootstrap bundle and `ckpt upload` (S3 through moto)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
from ckpt_helpers import REPO

from ckpt_agent import cli
from ckpt_agent.errors import EXIT_AWS, EXIT_CONFIG, EXIT_USAGE, ConfigError
from ckpt_agent.site import upload
from ckpt_agent.site.render import render_cluster_files, render_node_files, render_site, write_tree
from ckpt_agent.site.schema import load_site

EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
BUCKET, PREFIX = "my-eda-ckpt-bootstrap", "ckpt-agent/eda-spot"


def this_platform_only(site_text: str) -> str:
    """The site with a wheelhouse for this machine's Python and architecture only (a real, small `pip download`)."""
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return site_text.replace("  prefix: ckpt-agent/eda-spot\n", f"  prefix: ckpt-agent/eda-spot\n"
                             f"  pythons: ['{py}']\n  architectures: [{os.uname().machine}]\n")


@pytest.fixture()
def site_dir(tmp_path):
    """The example site file in a temporary directory, with a stand-in for the CRIU tarball it names."""
    d = tmp_path / "site"
    d.mkdir()
    (d / "site.yaml").write_text(this_platform_only(EXAMPLE.read_text()))
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
        assert "ckpt_agent/util/yamlschema.py" in names and "ckpt_agent/cli.py" in names
        assert not [n for n in names if "ckpt_dev" in n or n.endswith("/demo.py")], "no local cluster on nodes"
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
    assert (target / "ckpt_agent" / "site" / "schema.py").is_file()
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
    agent = [f for f in files if f.startswith("wheels/ckpt_agent-")]
    assert len(agent) == 1 and agent[0].endswith("-py3-none-any.whl"), agent
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
    version = re.search(r"/(b-[0-9a-f]{12})/on-node-configured\.sh", (render_dir / "cluster.yaml").read_text())[1]
    prefix = f"{PREFIX}/{version}"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]}
    assert f"{prefix}/on-node-configured.sh" in keys and f"{prefix}/SHA256SUMS" in keys
    assert f"{prefix}/nodes/sim-spot-xl/agent.yaml" in keys and f"{prefix}/criu/criu_4.2.1.orig.tar.xz" in keys
    assert f"{prefix}/patches/criu-4.2.1/0001-rlimits-from-proc.patch" in keys
    wheels = {k.rsplit("/", 1)[1].split("-")[0].lower() for k in keys if "/wheels/" in k}
    assert {"ckpt_agent", "pyyaml", "zstandard", "xxhash", "blake3", "boto3", "botocore"} <= wheels, wheels
    assert "jinja2" not in wheels, "Jinja2 is for the machine that renders, not for nodes"
    sums = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/SHA256SUMS")["Body"].read().decode().splitlines()
    assert {f"{prefix}/{line.split('  ')[1]}" for line in sums} | {f"{prefix}/SHA256SUMS"} == keys
    assert "uploaded" in err and f"s3://{BUCKET}/{prefix}/" in err


def test_bundle_version_follows_the_content(site_dir, tmp_path):
    site = load_site(str(site_dir / "site.yaml"))
    nodes = render_node_files(site, "site.yaml")
    wheel = upload.build_wheel(tmp_path / "w")
    first = upload.bundle_version(site, nodes, str(wheel))
    assert re.fullmatch(r"b-[0-9a-f]{12}", first)
    assert upload.bundle_version(site, dict(nodes), str(wheel)) == first, "same content, same version"
    changed = dict(nodes, **{"nodes/sim-spot/agent.yaml": nodes["nodes/sim-spot/agent.yaml"] + "# x\n"})
    assert upload.bundle_version(site, changed, str(wheel)) != first
    other = tmp_path / "o" / wheel.name
    other.parent.mkdir()
    other.write_bytes(wheel.read_bytes() + b"\0")
    assert upload.bundle_version(site, nodes, str(other)) != first
    # and cluster.yaml names it, so `pcluster update-cluster` sees a new bundle
    assert f"/{first}/" in render_cluster_files(site, "site.yaml", first)["cluster.yaml"]


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
    assert re.fullmatch(rf"ckpt: s3://{BUCKET}/{PREFIX}/b-[0-9a-f]{{12}}: S3 HeadBucket \(us-east-1\): 404: Not Found; "
                        rf"bucket {BUCKET} does not exist \(create it, or fix bundle.bucket\)", err.strip()), err


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
    assert str(e.value) == (f"s3://{BUCKET}/{PREFIX}/x: S3 PutObject: AccessDenied: no; the current AWS credentials "
                            "cannot write there")


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


def test_wheelhouse_serves_an_older_python_than_the_installed_versions_support(tmp_path):
    """A real `pip download` for Python 3.9 (Amazon Linux 2023's): where the versions installed here have no wheel
    for it (boto3 dropped 3.9), the newest that has one, within the agent's requirements."""
    names = upload.build_wheelhouse(tmp_path / "w", ["3.9"], ["aarch64"])
    lowered = [n.lower() for n in names]
    for package in ("pyyaml", "zstandard", "xxhash", "blake3", "boto3", "botocore"):
        assert any(n.startswith(package + "-") for n in lowered), (package, names)
    binary = [n for n in lowered if not n.endswith("-none-any.whl")]
    assert binary and all("cp39" in n and "aarch64" in n for n in binary), binary
