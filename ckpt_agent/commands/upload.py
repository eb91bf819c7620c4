"""`ckpt upload SITE.yaml [--render-dir DIR]`: render, build the bootstrap bundle (with its wheelhouse: this needs a
package index here, never on the nodes), upload it to s3://BUCKET/PREFIX/<bundle version>, create or update the
cluster's CloudWatch dashboard (site `monitoring.dashboard`), and print the `pcluster create-cluster` command to run
(for a running cluster: `pcluster update-cluster`, see docs/cluster-setup.md).

Exit codes: 2 for an invalid site file (problems on stderr), 78 for a missing local file, 80 for AWS failures.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile

from ckpt_agent.adapters.aws import aws_call
from ckpt_agent.commands.render import render_to
from ckpt_agent.errors import EXIT_USAGE
from ckpt_agent.site.dashboard import CloudWatchDashboard, dashboard_body, dashboard_name
from ckpt_agent.site.upload import S3Bundle, build_bundle

HELP = "upload the bootstrap bundle to S3 and print the pcluster create-cluster command"


def add_arguments(parser) -> None:
    parser.add_argument("site", metavar="SITE.yaml", help="the site file")
    parser.add_argument("--render-dir", metavar="DIR", help="render here (default: rendered/<cluster> next to SITE)")
    parser.add_argument("--wheel", metavar="FILE", help="upload this ckpt_agent wheel instead of building one")


def _client(service: str, region: str):
    import boto3

    with aws_call(service, "client", region=region):
        return boto3.client(service, region_name=region)


def _s3_client(region: str):
    return _client("s3", region)


def main(args) -> int:
    rendered = render_to(args.site, args.render_dir, args.wheel)
    if rendered is None:
        return EXIT_USAGE
    site, render_dir, _, version = rendered
    # A new version gets a new prefix: cluster.yaml names it, so `pcluster update-cluster` sees the change.
    target = S3Bundle(site["bundle"]["bucket"], f"{site['bundle']['prefix']}/{version}",
                      _s3_client(site["cluster"]["region"]))
    with tempfile.TemporaryDirectory(prefix="ckpt-bundle-") as tmp:
        files = build_bundle(site, args.site, render_dir, tmp, wheel=args.wheel)
        target.upload(tmp, files)
    print(f"uploaded {len(files)} files to {target.uri()}/", file=sys.stderr)
    if site["monitoring"]["dashboard"]:  # needs iam/uploader-dashboard-policy.json's permissions
        name = dashboard_name(site)
        CloudWatchDashboard(_client("cloudwatch", site["cluster"]["region"])).put(name, dashboard_body(site))
        print(f"put CloudWatch dashboard {name} in {site['cluster']['region']}", file=sys.stderr)
    print(f"bundle version {version}; for a running cluster: pcluster update-cluster --cluster-name "
          f"{shlex.quote(site['cluster']['name'])} --cluster-configuration "
          f"{shlex.quote(os.path.join(render_dir, 'cluster.yaml'))}", file=sys.stderr)
    command = [
        "pcluster", "create-cluster",
        "--cluster-name", site["cluster"]["name"],
        "--region", site["cluster"]["region"],
        "--cluster-configuration", os.path.join(render_dir, "cluster.yaml"),
    ]
    print(" ".join(shlex.quote(c) for c in command))
    return 0
