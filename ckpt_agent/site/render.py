"""Render a validated site file into the ParallelCluster configuration and the files each node installs.

Contract: `render_site(site, site_name, bundle_version)` returns {relative path: text} for
    cluster.yaml                     the ParallelCluster 3 configuration (for `pcluster create-cluster`); its custom
                                     actions name the bundle at s3://BUCKET/PREFIX/<bundle_version>
    iam/head-node-policy.json        the head node's least-privilege extra policy (prices, CloudWatch metrics)
and, from `render_node_files(site, site_name)` (what the bundle carries, hashed into its version):
    head/agent.yaml, head/node.env   the head node's agent config (for `ckpt gc`) and its bootstrap settings
    head/ckpt-gc.service, .timer     the cleanup, as a systemd timer (logs in the journal)
    head/ckpt-gc.cron                the same for a head node without systemd only, as /etc/cron.d/ckpt-gc
    nodes/<queue>/agent.yaml         each queue's agent config, installed as /etc/ckpt-agent/agent.yaml
    nodes/<queue>/node.env           each queue's bootstrap settings, sourced by bootstrap/on-node-configured.sh
    systemd/ckpt-agent.service       the agent's unit
    head/job_submit.lua              only when some queue has transparent checkpointing: the Slurm job_submit
                                     plugin the head node installs next to slurm.conf (`render_job_submit`)
    profile.d/ckpt-agent.sh          puts `ckpt` on users' PATH, installed in /etc/profile.d
`write_tree(out_dir, files)` writes them atomically. Output depends only on the site data and the site file's
base name, so committed renders can be compared byte for byte. Templates use StrictUndefined: a missing value is a
bug, never an empty string. Values that reach a shell go through the `sh` filter (shlex.quote).

Templates are looked up in $CKPT_TEMPLATES_DIR, then `ckpt_agent/templates` (package data, for installs from a wheel
that ships them), then the repository's top-level `templates/` next to the package (source checkouts and editable
installs, which is how admins run `ckpt render`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List

import jinja2
import yaml

from ckpt_agent import PACKAGE_DIR
from ckpt_agent.errors import ConfigError
from ckpt_agent.site.schema import REQUIRED_SLURM_SETTINGS, TRANSPARENT_SLURM_SETTINGS, cpu_family
from ckpt_agent.util import safeio

# Where things live on the nodes; the bootstrap script reads these from node.env, never hard-codes them twice.
NODE_VENV = "/opt/ckpt-agent/venv"
NODE_BIN_DIR = "/opt/ckpt-agent/bin"  # only a `ckpt` link: what /etc/profile.d/ckpt-agent.sh adds to PATH
NODE_CONFIG = "/etc/ckpt-agent/agent.yaml"
NODE_KEY_FILE = "/etc/ckpt-agent/node.key"
NODE_RUNTIME_DIR = "/run/ckpt-agent"
# The head node's /opt/parallelcluster/shared is NFS-exported to every compute node with no_root_squash, so a
# root-only directory there can carry the cluster's HMAC key and the CRIU build.
NODE_SHARED_DIR = "/opt/parallelcluster/shared/ckpt-agent"
NODE_CRIU = "/usr/local/sbin/criu"  # install-criu.sh's default prefix
NODE_SLURM_ETC = "/opt/slurm/etc"  # ParallelCluster's slurm.conf directory: slurmctld looks for job_submit.lua there
SCRIPT_NAME = "on-node-configured.sh"
# Transparent mode runs a whole batch script as this step of `ckpt run`.
TRANSPARENT_STEP = "batch"

TEMPLATE_FILES = ("cluster.yaml.j2", "agent.yaml.j2", "node.env.j2", "ckpt-agent.service.j2", "ckpt-gc.cron.j2",
                  "job_submit.lua.j2", "ckpt-gc.service.j2", "ckpt-gc.timer.j2", "ckpt-profile.sh.j2")
UNVERSIONED = "b-unversioned"  # bundle version of a render that has no bundle to hash (library use, tests)
# PATH of every unit and timer: systemd reads no profile.d, and ParallelCluster's Slurm is only in /opt/slurm/bin.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_DOW = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def templates_dir() -> Path:
    """The first directory that holds all templates: $CKPT_TEMPLATES_DIR, package data, the repository's."""
    package = PACKAGE_DIR
    candidates: List[Path] = []
    if os.environ.get("CKPT_TEMPLATES_DIR"):
        candidates.append(Path(os.environ["CKPT_TEMPLATES_DIR"]))
    candidates += [package / "templates", package.parent / "templates"]
    for cand in candidates:
        if all((cand / name).is_file() for name in TEMPLATE_FILES):
            return cand
    raise ConfigError(
        f"templates not found (looked in {', '.join(str(c) for c in candidates)}); set CKPT_TEMPLATES_DIR to the "
        "repository's templates/ directory"
    )


def yaml_scalar(value: Any) -> str:
    """A value as YAML flow text, quoted only where YAML needs it ('4711' stays a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    for suffix in ("\n...\n", "\n"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def shell_quote(value: Any) -> str:
    if isinstance(value, bool):
        value = int(value)
    return shlex.quote(str(value))


def lua_string(value: Any) -> str:
    """A Lua string literal for `value` (every byte outside printable ASCII, quotes and backslash escaped)."""
    out = []
    for byte in str(value).encode("utf-8"):
        ch = chr(byte)
        out.append(ch if 32 <= byte < 127 and ch not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["y"] = yaml_scalar
    env.filters["sh"] = shell_quote
    env.filters["lua"] = lua_string
    return env


def bundle_uri(site: Dict[str, Any], version: str = "") -> str:
    base = f"s3://{site['bundle']['bucket']}/{site['bundle']['prefix']}"
    return f"{base}/{version}" if version else base


def _cron_field(text: str, dow: bool = False) -> str:
    """One cron field in systemd.time(7) syntax: '*/15' -> '0/15', '1-5' -> '1..5', weekday numbers -> names."""
    out = []
    for part in text.split(","):
        base, _, step = part.partition("/")
        if dow:
            names = [_DOW[int(x)] if x.isdigit() and int(x) < 8 else x.capitalize()[:3] for x in base.split("-")]
            if step or base == "*":
                raise ValueError("steps and '*' are not supported in the weekday field")
            out.append("..".join(names))
            continue
        if base == "*":
            base = "0" if step else "*"
        out.append(base.replace("-", "..") + (f"/{step}" if step else ""))
    return ",".join(out)


def oncalendar(schedule: str) -> str:
    """A 5-field cron schedule as a systemd OnCalendar= expression ('*/15 * * * *' -> '*-*-* *:0/15:00')."""
    minute, hour, dom, month, dow = schedule.split()
    try:
        when = f"*-{_cron_field(month)}-{_cron_field(dom)} {_cron_field(hour)}:{_cron_field(minute)}:00"
        return when if dow == "*" else f"{_cron_field(dow, dow=True)} {when}"
    except (ValueError, IndexError) as e:
        raise ConfigError(f"cleanup.schedule {schedule!r}: cannot be written as a systemd timer: {e}") from e


def aws_partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def head_node_policy(site: Dict[str, Any]) -> Dict[str, Any]:
    """What the head node's `ckpt prices --update` and `ckpt report --cloudwatch` call, and nothing more.
    Spot price history and the Price List API have no resource-level permissions; PutMetricData is limited to
    the site's namespace."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "CkptPrices", "Effect": "Allow",
             "Action": ["ec2:DescribeSpotPriceHistory", "pricing:GetProducts"], "Resource": "*"},
            {"Sid": "CkptMetrics", "Effect": "Allow", "Action": "cloudwatch:PutMetricData", "Resource": "*",
             "Condition": {"StringEquals": {"cloudwatch:namespace": site["iam"]["cloudwatch_namespace"]}}},
        ],
    }


def head_policy_name(site: Dict[str, Any]) -> str:
    return f"ckpt-{site['cluster']['name']}-head-node"


def _head_policies(site: Dict[str, Any]) -> List[str]:
    policies = list(site["head_node"]["iam"]["additional_policies"])
    account = site["iam"].get("account_id")
    if account:
        arn = f"arn:{aws_partition(site['cluster']['region'])}:iam::{account}:policy/{head_policy_name(site)}"
        if arn not in policies:
            policies.insert(0, arn)
    return policies


def criu_source_in_bundle(site: Dict[str, Any]) -> str:
    """How node.env names the CRIU tarball: a URL as given, `bundle:criu/<file>` for a local file, or empty."""
    source = site["criu"].get("source") or ""
    if not source or "://" in source:
        return source
    return f"bundle:criu/{os.path.basename(source)}"


def compute_resources(queue: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One compute resource per CPU family of the queue, named after the family. ParallelCluster gives every node
    its compute resource's name as a Slurm feature (cookbook config_renderer.py: Feature=dynamic,...,<name>), so the
    agent can constrain a requeued job to its family (agent.cpu_families). Static nodes (min_count) go to the
    first family; max_count applies to each family."""
    families: Dict[str, List[str]] = {}
    for itype in queue["instance_types"]:
        families.setdefault(cpu_family(itype), []).append(itype)
    return [{"name": name, "instance_types": types, "min_count": queue["min_count"] if i == 0 else 0,
             "max_count": queue["max_count"]} for i, (name, types) in enumerate(families.items())]


def _s3_buckets(site: Dict[str, Any]) -> List[Dict[str, str]]:
    """Read access the nodes need: the bundle prefix, and the CRIU tarball's bucket when it is an s3:// URL."""
    access = [{"bucket": site["bundle"]["bucket"], "key": site["bundle"]["prefix"] + "/*"}]
    source = site["criu"].get("source") or ""
    if source.startswith("s3://"):
        bucket, _, key = source[len("s3://"):].partition("/")
        if bucket != site["bundle"]["bucket"] or not key.startswith(site["bundle"]["prefix"] + "/"):
            access.append({"bucket": bucket, "key": key})
    return access


def _context(site: Dict[str, Any], site_name: str, version: str = UNVERSIONED) -> Dict[str, Any]:
    storage = site["storage"]
    store = f"{storage['mount_dir']}/{storage['checkpoint_dir']}"
    return {
        "header": f"generated from {site_name} by `ckpt render`; do not edit: edit {site_name} and render again",
        "site": site,
        "store": store,
        "bundle_version": version,
        "bundle_uri": bundle_uri(site, version),
        "script_uri": f"{bundle_uri(site, version)}/{SCRIPT_NAME}",
        "unit_path": f"{site['slurm']['bin_dir']}:{BASE_PATH}",
        "gc_calendar": oncalendar(site["cleanup"]["schedule"]),
        "queue_keep": {q["name"]: q["checkpoint"]["keep"] for q in site["queues"] if q["checkpoint"]["enabled"]},
        "head_policies": _head_policies(site),
        "s3_access": _s3_buckets(site),
        "slurm_settings": {**REQUIRED_SLURM_SETTINGS,
                           **(TRANSPARENT_SLURM_SETTINGS if transparent_queues(site) else {}),
                           **site["slurm"]["settings"]},
        "compute_resources": {q["name"]: compute_resources(q) for q in site["queues"]},
        # The head node builds CRIU for the cluster only when some queue checkpoints.
        "any_checkpointing": any(q["checkpoint"]["enabled"] for q in site["queues"]),
        "criu_source": criu_source_in_bundle(site),
        "transparent": bool(transparent_queues(site)),
        "paths": {
            "venv": NODE_VENV,
            "bin_dir": NODE_BIN_DIR,
            "config": NODE_CONFIG,
            "key_file": NODE_KEY_FILE,
            "runtime_dir": NODE_RUNTIME_DIR,
            "shared_dir": NODE_SHARED_DIR,
            "criu": NODE_CRIU,
            "slurm_etc": NODE_SLURM_ETC,
        },
    }


def transparent_queues(site: Dict[str, Any]) -> List[str]:
    return [q["name"] for q in site["queues"] if q["checkpoint"]["enabled"] and q["checkpoint"]["transparent"]]


def render_job_submit(*, header: str, partitions: List[str], default_partition: str, ckpt: str,
                      opt_out_comment: str, opt_out_env: str) -> str:
    """job_submit.lua: batch jobs on `partitions` (a job naming none runs on `default_partition`) run under
    `ckpt` (the path of the `ckpt` command on the nodes). The local cluster renders its own with this too."""
    return _environment().get_template("job_submit.lua.j2").render(
        header=header, partitions=partitions, default_partition=default_partition, ckpt=ckpt,
        opt_out_comment=opt_out_comment, opt_out_env=opt_out_env, step=TRANSPARENT_STEP)


def render_node_files(site: Dict[str, Any], site_name: str) -> Dict[str, str]:
    """The files nodes install (the bundle's rendered part), as {relative path: text}, in a stable order."""
    env = _environment()
    ctx = _context(site, site_name)
    prices = site["prices"]
    files: Dict[str, str] = {}
    files["head/agent.yaml"] = env.get_template("agent.yaml.j2").render(ctx, role="head", queue=None, prices=prices)
    files["head/node.env"] = env.get_template("node.env.j2").render(ctx, role="head", queue=None)
    files["head/ckpt-gc.service"] = env.get_template("ckpt-gc.service.j2").render(ctx)
    files["head/ckpt-gc.timer"] = env.get_template("ckpt-gc.timer.j2").render(ctx)
    files["head/ckpt-gc.cron"] = env.get_template("ckpt-gc.cron.j2").render(ctx)
    for queue in site["queues"]:
        own = {t: prices[t] for t in queue["instance_types"] if t in prices}
        base = f"nodes/{queue['name']}"
        files[f"{base}/agent.yaml"] = env.get_template("agent.yaml.j2").render(
            ctx, role="compute", queue=queue, prices=own
        )
        files[f"{base}/node.env"] = env.get_template("node.env.j2").render(ctx, role="compute", queue=queue)
    files["systemd/ckpt-agent.service"] = env.get_template("ckpt-agent.service.j2").render(ctx)
    if transparent_queues(site):
        # ParallelCluster makes the first queue the default partition
        files["head/job_submit.lua"] = render_job_submit(
            header=ctx["header"], partitions=transparent_queues(site), default_partition=site["queues"][0]["name"],
            ckpt=f"{NODE_VENV}/bin/ckpt", opt_out_comment=site["transparent"]["opt_out_comment"],
            opt_out_env=site["transparent"]["opt_out_env"])
    files["profile.d/ckpt-agent.sh"] = env.get_template("ckpt-profile.sh.j2").render(ctx)
    return files


def render_cluster_files(site: Dict[str, Any], site_name: str, bundle_version: str = UNVERSIONED) -> Dict[str, str]:
    """cluster.yaml for the bundle `bundle_version`, and the head node's IAM policy document."""
    if not re.fullmatch(r"b-[0-9a-z]+", bundle_version):
        raise ConfigError(f"bad bundle version {bundle_version!r}")
    env = _environment()
    ctx = _context(site, site_name, bundle_version)
    return {
        "cluster.yaml": env.get_template("cluster.yaml.j2").render(ctx),
        "iam/head-node-policy.json": json.dumps(head_node_policy(site), indent=2) + "\n",
        **_monitoring_files(site),
    }


def render_site(site: Dict[str, Any], site_name: str, bundle_version: str = UNVERSIONED) -> Dict[str, str]:
    """Every generated file for `site` as {relative path: text}, in a stable order."""
    return {**render_cluster_files(site, site_name, bundle_version), **render_node_files(site, site_name)}


def _monitoring_files(site: Dict[str, Any]) -> Dict[str, str]:
    """The CloudWatch dashboard body (`ckpt upload` puts it) and the IAM policies monitoring needs (JSON carries no
    comment: iam/README names their source)."""
    from ckpt_agent.site.dashboard import dashboard_json, nodes_policy, uploader_policy

    out: Dict[str, str] = {}
    if site["monitoring"]["dashboard"]:
        out["dashboard.json"] = dashboard_json(site)
    out["iam/nodes-monitoring-policy.json"] = json.dumps(nodes_policy(site), indent=2) + "\n"
    out["iam/uploader-dashboard-policy.json"] = json.dumps(uploader_policy(site), indent=2) + "\n"
    return out


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` (creating its directory) through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_atomic(str(path), text.encode("utf-8"), mode)


def write_tree(out_dir: str, files: Dict[str, str]) -> List[str]:
    """Write `files` under `out_dir`; remove generated files a previous render left for queues that are gone."""
    root = Path(out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            write_atomic(root / rel, text)
        for stale in sorted(root.glob("nodes/*/*")) + sorted(root.glob("head/*")):
            rel = stale.relative_to(root).as_posix()
            if rel not in files and stale.is_file() and _is_generated(stale):
                stale.unlink()
                if not any(stale.parent.iterdir()):
                    stale.parent.rmdir()
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot write rendered files: {e.strerror or e}") from e
    return sorted(files)


def _is_generated(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return "by `ckpt render`; do not edit" in fh.readline()
