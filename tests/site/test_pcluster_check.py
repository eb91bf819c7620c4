"""The rendered cluster.yaml against the real aws-parallelcluster 3.16.1 package: its schema, and its full validator
tree with moto answering the AWS calls (recipe: /work/shared/notes/parallelcluster-notes.md §5.3)."""

from __future__ import annotations

import copy

import pytest
from ckpt_helpers import REPO

from ckpt_agent.site import pcluster_check
from ckpt_agent.site.render import UNVERSIONED, render_site
from ckpt_agent.site.schema import REQUIRED_SLURM_SETTINGS, SLURM_CONF_DENY_LIST, load_site

pytestmark = pytest.mark.pcluster
pytest.importorskip("pcluster")

EXAMPLE = REPO / "cluster-configs" / "site.example.yaml"
PCLUSTER_VERSION = "3.16.1"
OS_IMAGE_PART = {"alinux2023": "amzn2023-hvm", "ubuntu2404": "ubuntu-2404-lts-hvm", "rhel9": "rhel9-hvm"}


@pytest.fixture(scope="module")
def example_site():
    return load_site(str(EXAMPLE))


def _cluster_yaml(site) -> str:
    return render_site(site, "site.example.yaml")["cluster.yaml"]


def test_example_passes_the_schema(example_site):
    assert pcluster_check.check_schema(_cluster_yaml(example_site)) == []


def test_schema_check_reports_problems(example_site):
    text = _cluster_yaml(example_site).replace("CapacityType: SPOT", "CapacityType: SPOTTY", 1)
    problems = pcluster_check.check_schema(text)
    assert problems == ["Scheduling.SlurmQueues.0.CapacityType: Must be one of: CAPACITY_BLOCK, ONDEMAND, SPOT."]


def test_existing_file_system_passes_the_schema(example_site):
    site = copy.deepcopy(example_site)
    site["storage"]["new"] = None
    site["storage"]["existing_file_system_id"] = "fs-0123456789abcdef0"
    text = _cluster_yaml(site)
    assert "FileSystemId: fs-0123456789abcdef0" in text and "StorageCapacity" not in text
    assert pcluster_check.check_schema(text) == []


def test_vendored_deny_list_matches_the_package():
    import pcluster.config.cluster_config  # noqa: F401
    from pcluster.validators.slurm_settings_validator import SLURM_SETTINGS_DENY_LIST

    assert {k.lower() for k in SLURM_CONF_DENY_LIST} == {
        k.lower() for k in SLURM_SETTINGS_DENY_LIST["SlurmConf"]["Global"]
    }
    denied = {k.lower() for k in SLURM_SETTINGS_DENY_LIST["SlurmConf"]["Global"]}
    assert not denied & {k.lower() for k in REQUIRED_SLURM_SETTINGS}


# ---- full validator tree against moto --------------------------------------------------------------------------


@pytest.fixture()
def moto_aws(monkeypatch, tmp_path):
    """In-process moto with fake official ParallelCluster AMIs, managed IAM policies and no real credentials."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # pcluster writes its log under ~/.parallelcluster
    from moto import mock_aws
    from moto.ec2.models import amis

    fake = [
        {
            "ami_id": f"ami-0pc{i:014d}",
            "name": f"aws-parallelcluster-{PCLUSTER_VERSION}-{part}-{arch}-202509010000 2025-09-01T00-00-00.000Z",
            "description": "fake official ParallelCluster AMI",
            "owner_id": "247102896272",
            "public": True,
            "virtualization_type": "hvm",
            "architecture": arch,
            "state": "available",
            "root_device_type": "ebs",
            "root_device_name": "/dev/xvda",
            "image_type": "machine",
            "hypervisor": "xen",
            "sriov": "simple",
            "creation_date": "2025-09-01T00:00:00.000Z",
        }
        for i, (part, arch) in enumerate((p, a) for p in OS_IMAGE_PART.values() for a in ("x86_64", "arm64"))
    ]
    monkeypatch.setattr(amis, "AMIS", list(amis.AMIS) + fake)
    with mock_aws():
        from pcluster.aws.aws_api import AWSApi
        from pcluster.aws.common import Cache

        AWSApi.reset()
        Cache.clear_all()
        yield
        AWSApi.reset()
        Cache.clear_all()


def _seed(site) -> dict:
    """VPC, public subnet, ed25519 key pair and the bundle's script in moto; returns the site pointed at them."""
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsSupport={"Value": True})
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]
    ec2.create_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    ec2.create_key_pair(KeyName=site["cluster"]["key_name"], KeyType="ed25519")
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket=site["bundle"]["bucket"])
    s3.put_object(
        Bucket=site["bundle"]["bucket"], Key=f"{site['bundle']['prefix']}/{UNVERSIONED}/on-node-configured.sh",
        Body=b"#!/bin/bash\n",
    )
    site = copy.deepcopy(site)
    site["cluster"]["subnet_id"] = subnet
    return site


def test_example_passes_every_validator(moto_aws, example_site):
    site = _seed(example_site)
    problems = pcluster_check.check_full(
        _cluster_yaml(site), cluster_name=site["cluster"]["name"], suppress=pcluster_check.LAUNCH_TEMPLATE_VALIDATORS
    )
    assert problems == []


def test_existing_file_system_passes_every_validator(moto_aws, example_site):
    """moto's FSx ids are too short for pcluster's schema, so the file system is put into pcluster's FSx cache, with
    a real moto network interface whose security group admits Lustre (TCP 988) both ways."""
    import boto3
    from pcluster.aws.aws_api import AWSApi
    from pcluster.aws.aws_resources import FsxStorageInfo

    site = _seed(example_site)
    site["storage"]["new"] = None
    site["storage"]["existing_file_system_id"] = fs_id = "fs-0123456789abcdef0"
    ec2 = boto3.client("ec2", region_name="us-east-1")
    subnet = site["cluster"]["subnet_id"]
    vpc = ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["VpcId"]
    sg = ec2.create_security_group(GroupName="lustre", Description="lustre", VpcId=vpc)["GroupId"]
    rule = [{"IpProtocol": "tcp", "FromPort": 988, "ToPort": 988, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=rule)
    eni = ec2.create_network_interface(SubnetId=subnet, Groups=[sg])["NetworkInterface"]["NetworkInterfaceId"]
    AWSApi.instance().fsx.cache[fs_id] = FsxStorageInfo({
        "FileSystemId": fs_id, "FileSystemType": "LUSTRE", "Lifecycle": "AVAILABLE", "VpcId": vpc,
        "SubnetIds": [subnet], "NetworkInterfaceIds": [eni], "DNSName": f"{fs_id}.fsx.us-east-1.amazonaws.com",
        "LustreConfiguration": {"MountName": "abcdefgh", "DeploymentType": "PERSISTENT_2"},
    })
    problems = pcluster_check.check_full(
        _cluster_yaml(site), cluster_name=site["cluster"]["name"], suppress=pcluster_check.LAUNCH_TEMPLATE_VALIDATORS
    )
    assert problems == []


def test_full_check_catches_what_the_schema_cannot(moto_aws, example_site):
    site = _seed(example_site)
    site["cluster"]["key_name"] = "nobody-has-this-key"
    text = _cluster_yaml(site).replace("- KillWait: 60", "- SlurmctldParameters: x")
    text = text.replace("AllocationStrategy: price-capacity-optimized", "AllocationStrategy: prioritized", 1)
    assert pcluster_check.check_schema(text) == []
    problems = pcluster_check.check_full(
        text, cluster_name=site["cluster"]["name"], suppress=pcluster_check.LAUNCH_TEMPLATE_VALIDATORS
    )
    kinds = sorted({p.split(":")[0] for p in problems})  # one allocation-strategy error per compute resource
    assert kinds == [
        "ERROR CustomSlurmSettingsValidator",
        "ERROR InstancesAllocationStrategyValidator",
        "ERROR KeyPairValidator",
    ], problems


def test_validate_command_with_pcluster_schema(capsys):
    from ckpt_agent import cli

    assert cli.main(["validate", "--pcluster", str(EXAMPLE)]) == 0
    assert "valid (and ParallelCluster's schema): cluster eda-spot" in capsys.readouterr().out


def test_validate_command_reports_pcluster_schema_problems(capsys, monkeypatch):
    from ckpt_agent import cli

    real = pcluster_check.check_schema
    monkeypatch.setattr(pcluster_check, "check_schema", lambda text, **kw: real(text.replace("Os: ", "Os: x"), **kw))
    assert cli.main(["validate", "--pcluster", str(EXAMPLE)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"{EXAMPLE}: rendered cluster.yaml: Image.Os: Must be one of: ")
