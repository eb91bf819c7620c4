"""The admin's site file: one YAML describing the cluster, its Spot queues and how they checkpoint.

Contract: `load_site(path)` reads and validates the file strictly and returns the data with every default filled in
(durations in seconds), or raises `SiteInvalid` carrying every problem as `FILE:LINE: key.path: message`. Malformed
or unreadable files raise ConfigError (exit 78); invalid content raises SiteInvalid (exit 2, as `ckpt validate`).

The rules mirror what ParallelCluster 3.16 would reject later (names, allocation strategies, FSx capacity steps,
deny-listed Slurm settings) so that admins see all of it before anything reaches AWS; the real package still checks
the rendered cluster.yaml in the tests.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Dict
from typing import List as ListT

from ckpt_agent.errors import ConfigError, UsageError
from ckpt_agent.node import fields as F
from ckpt_agent.util.yamlschema import (
    AnyMap,
    Bool,
    Context,
    Field,
    Int,
    List,
    Map,
    Path,
    Problem,
    Scalar,
    Str,
    load_yaml_with_lines,
    read_config_text,
    validate,
)

# Pinned with bootstrap/install-criu.sh: its built-in checksum is for this release.
DEFAULT_CRIU_VERSION = "4.2.1"
SUPPORTED_OSES = ("alinux2023", "ubuntu2204", "ubuntu2404", "rhel8", "rhel9", "rocky8", "rocky9")
SPOT_STRATEGIES = ("price-capacity-optimized", "capacity-optimized", "lowest-price", "capacity-optimized-prioritized")
ONDEMAND_STRATEGIES = ("lowest-price", "prioritized")
ALL_STRATEGIES = tuple(dict.fromkeys(SPOT_STRATEGIES + ONDEMAND_STRATEGIES))
FSX_DEPLOYMENT_TYPES = ("SCRATCH_1", "SCRATCH_2", "PERSISTENT_1", "PERSISTENT_2")
FSX_THROUGHPUTS = {"PERSISTENT_1": (50, 100, 200), "PERSISTENT_2": (125, 250, 500, 1000)}
# Node Pythons the bundle's wheelhouse serves: AL2023 and RHEL 9 ship 3.9, Ubuntu 22.04 3.10, Ubuntu 24.04 3.12;
# 3.11 is AL2023's and RHEL's optional python3.11. The bootstrap picks the first of these a node has.
SUPPORTED_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
SUPPORTED_ARCHITECTURES = ("x86_64", "aarch64")
MAX_QUEUES = 50  # ParallelCluster's MAX_NUMBER_OF_QUEUES
QUEUE_NAME_MAX = 25  # ParallelCluster's NAME_MAX_LENGTH for queues and compute resources
MAX_COMPUTE_RESOURCES = 50  # ParallelCluster's MAX_NUMBER_OF_COMPUTE_RESOURCES_PER_CLUSTER


def cpu_family(instance_type: str) -> str:
    """The instance family ("r6i" for r6i.4xlarge): all sizes of a family run on one processor model, so a
    checkpoint taken on one restores on any (CRIU's --cpu-cap=fpu,ins check passes); across families (Intel r6i,
    AMD r6a, older Intel r5) it may not. `ckpt render` makes one compute resource per family of a queue."""
    return instance_type.split(".", 1)[0]

# Slurm settings the product relies on, written into slurm.conf through CustomSlurmSettings:
#   JobRequeue=1     a batch job interrupted by a reclaimed node goes back to the queue (and resumes from its
#                    checkpoint) instead of failing; Slurm's default, made explicit so a site default cannot drop it.
#   JobFileAppend=1  a requeued job appends to its output file instead of truncating what the first run wrote.
REQUIRED_SLURM_SETTINGS = {"JobRequeue": 1, "JobFileAppend": 1}
# Added when some queue has transparent checkpointing: slurmctld runs the rendered job_submit.lua (next to slurm.conf)
# on every submission. Not on ParallelCluster's deny list.
TRANSPARENT_SLURM_SETTINGS = {"JobSubmitPlugins": "lua"}

# ParallelCluster 3.16.1 refuses these at slurm.conf level (pcluster/validators/slurm_settings_validator.py,
# SLURM_SETTINGS_DENY_LIST["SlurmConf"]["Global"]); a test compares this copy with the installed package.
SLURM_CONF_DENY_LIST = (
    "Epilog",
    "GresTypes",
    "LaunchParameters",
    "Prolog",
    "ReconfigFlags",
    "ResumeFailProgram",
    "ResumeProgram",
    "ResumeTimeout",
    "SlurmctldHost",
    "SlurmctldLogFile",
    "SlurmctldParameters",
    "SlurmdLogFile",
    "SlurmUser",
    "SuspendExcNodes",
    "SuspendProgram",
    "SuspendTime",
    "TaskPlugin",
    "TreeWidth",
)


class SiteInvalid(UsageError):
    """The site file has problems; `problems` holds all of them."""

    def __init__(self, source: str, problems: ListT[Problem]) -> None:
        self.problems = problems
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''} found (run 'ckpt validate {source}')")


# ---- cross-field rules -----------------------------------------------------------------------------------------


def _rule_cluster(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    for key in d.get("tags") or {}:
        if str(key).lower().startswith("parallelcluster:"):
            ctx.error(path + ("tags", key), "the 'parallelcluster:' tag prefix is reserved by ParallelCluster")


def _rule_fsx_new(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    kind, cap, thr = d.get("deployment_type"), d.get("storage_capacity_gib"), d.get("throughput_mb_s_per_tib")
    if kind is None:
        return
    if cap is not None:
        if kind == "SCRATCH_1" and not (cap in (1200, 2400) or cap % 3600 == 0):
            ctx.error(path + ("storage_capacity_gib",), f"{kind} needs 1200, 2400 or a multiple of 3600 GiB, got {cap}")
        elif kind != "SCRATCH_1" and not (cap == 1200 or cap % 2400 == 0):
            ctx.error(path + ("storage_capacity_gib",), f"{kind} needs 1200 or a multiple of 2400 GiB, got {cap}")
    allowed = FSX_THROUGHPUTS.get(kind)
    if allowed and thr is None:
        ctx.error(path, f"{kind} needs throughput_mb_s_per_tib (one of {', '.join(map(str, allowed))})")
    elif allowed and thr not in allowed:
        ctx.error(
            path + ("throughput_mb_s_per_tib",), f"{kind} allows {', '.join(map(str, allowed))} MB/s/TiB, got {thr}"
        )
    elif not allowed and thr is not None:
        ctx.error(path + ("throughput_mb_s_per_tib",), f"{kind} has a fixed throughput: remove this key")


def _rule_storage(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    # A key given with a bad value counts as given: its own problem is reported already.
    has_new = d.get("new") is not None or ctx.failed(path + ("new",))
    has_existing = d.get("existing_file_system_id") is not None or ctx.failed(path + ("existing_file_system_id",))
    if has_new == has_existing:
        ctx.error(path, "set exactly one of 'new' (ParallelCluster creates the FSx file system) or "
                        "'existing_file_system_id'")
    mount = d.get("mount_dir")
    if mount is not None and (posixpath.normpath(mount) != mount or mount == "/"):
        ctx.error(path + ("mount_dir",), f"must be a normalized absolute directory other than /, got {mount!r}")
    sub = d.get("checkpoint_dir")
    if sub is not None and (sub.startswith("/") or ".." in sub.split("/") or posixpath.normpath(sub) != sub):
        ctx.error(path + ("checkpoint_dir",), f"must be a relative path below mount_dir without '..', got {sub!r}")


def _rule_criu(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    if d.get("version") not in (None, DEFAULT_CRIU_VERSION) and not d.get("sha256"):
        ctx.error(path, f"sha256 is required when version is not {DEFAULT_CRIU_VERSION} (install-criu.sh verifies it)")
    if not d.get("preinstalled") and not d.get("source"):
        ctx.error(
            path,
            "missing 'source': the CRIU release tarball (a local file, bundled by 'ckpt upload', or an https/s3 "
            "URL), or set 'preinstalled: true' for an AMI that already has CRIU",
        )


def _rule_bundle(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    for i, v in enumerate(d.get("pythons") or []):
        if v not in SUPPORTED_PYTHONS:
            ctx.error(path + ("pythons", i), f"must be one of {', '.join(SUPPORTED_PYTHONS)}, got {v!r}")


_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,-]+")


def _rule_cleanup(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    F.rule_watermarks(d, path, ctx)
    fields = (d.get("schedule") or "").split()
    if d.get("schedule") is not None and (len(fields) != 5 or not all(_CRON_FIELD.fullmatch(f) for f in fields)):
        ctx.error(path + ("schedule",), f"must be a 5-field cron schedule like '*/15 * * * *', got {d['schedule']!r}")


def _rule_slurm(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    denied = {k.lower() for k in SLURM_CONF_DENY_LIST}
    for key in d.get("settings") or {}:
        if key.lower() in denied:
            ctx.error(path + ("settings", key), "ParallelCluster does not allow this setting in CustomSlurmSettings")
        for req, req_value in REQUIRED_SLURM_SETTINGS.items():
            if key.lower() == req.lower():
                ctx.error(
                    path + ("settings", key),
                    f"set by ckpt to {req_value} (checkpointed jobs rely on it); remove this key",
                )


def _rule_queue(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    name, capacity, strategy = d.get("name"), d.get("capacity"), d.get("allocation_strategy")
    if name == "default":
        ctx.error(path + ("name",), "'default' is reserved by ParallelCluster")
    if name is not None and name.lower() == "head":
        ctx.error(path + ("name",), "'head' names the head node's files in the bundle; choose another name")
    if capacity == "spot" and strategy is not None and strategy not in SPOT_STRATEGIES:
        ctx.error(
            path + ("allocation_strategy",),
            f"a Spot queue cannot use {strategy!r}; use one of {', '.join(SPOT_STRATEGIES)}",
        )
    if capacity == "ondemand" and strategy is not None and strategy not in ONDEMAND_STRATEGIES:
        ctx.error(
            path + ("allocation_strategy",),
            f"an On-Demand queue cannot use {strategy!r}; use one of {', '.join(ONDEMAND_STRATEGIES)}",
        )
    if strategy is None and capacity is not None:
        d["allocation_strategy"] = "price-capacity-optimized" if capacity == "spot" else "lowest-price"
    low, high = d.get("min_count"), d.get("max_count")
    if low is not None and high is not None and low > high:
        ctx.error(path + ("min_count",), f"must be <= max_count ({high}), got {low}")
    ckpt = d.get("checkpoint") or {}
    if ckpt.get("transparent") and ckpt.get("enabled") is False:
        ctx.error(path + ("checkpoint", "transparent"), "needs checkpointing: set checkpoint.enabled: true")
    if d.get("checkpoint") and capacity == "ondemand" and d["checkpoint"].get("rebalance_action") == "drain":
        ctx.error(path + ("checkpoint", "rebalance_action"), "On-Demand nodes get no rebalance recommendations")


def _rule_site(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    seen: Dict[str, int] = {}
    for i, q in enumerate(d.get("queues") or []):
        name = q.get("name")
        if name is None:
            continue
        if name in seen:
            ctx.error(("queues", i, "name"), f"duplicate queue name {name!r} (first at queues[{seen[name]}])")
        seen.setdefault(name, i)
    transparent = [q.get("name") for q in d.get("queues") or [] if (q.get("checkpoint") or {}).get("transparent")]
    for key in (d.get("slurm") or {}).get("settings") or {}:
        for name, value in TRANSPARENT_SLURM_SETTINGS.items():
            if transparent and key.lower() == name.lower():
                ctx.error(("slurm", "settings", key), f"set by ckpt to {value} for transparent checkpointing (queue "
                                                      f"{transparent[0]}); remove this key")
    queue_types = set()
    resources = 0
    for q in d.get("queues") or []:
        queue_types.update(q.get("instance_types") or [])
        resources += len({cpu_family(t) for t in q.get("instance_types") or []})
    if resources > MAX_COMPUTE_RESOURCES:
        ctx.error(("queues",), f"{resources} compute resources (one per queue and instance family); ParallelCluster "
                               f"allows at most {MAX_COMPUTE_RESOURCES}")
    for itype in d.get("prices") or {}:
        if queue_types and itype not in queue_types:
            ctx.error(("prices", itype), "not an instance type of any queue")


def _rule_monitoring(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    if d.get("sns_topic_arn") and d.get("event_bus"):
        ctx.error(path, "set at most one of 'sns_topic_arn' and 'event_bus' for notifications")


# ---- the schema ------------------------------------------------------------------------------------------------

_NAME = Str(pattern=r"[a-z][a-z0-9-]*", pattern_help="lowercase letters, digits and '-', starting with a letter",
            max_len=QUEUE_NAME_MAX)
_INSTANCE_TYPE = F.INSTANCE_TYPE

_ACTION = Map(
    {
        "script": Field(Str(pattern=r"(s3|https)://\S+", pattern_help="an s3:// or https:// URL"), required=True),
        "args": Field(List(Str(min_len=0)), default=list),
    }
)
_AROUND = Map({"before": Field(List(_ACTION), default=list), "after": Field(List(_ACTION), default=list)})
# The admin's own ParallelCluster custom actions, run in one Sequence with ours (ours between `before` and `after`).
HEAD_ACTIONS = Map(
    {
        "on_node_start": Field(List(_ACTION), default=list),
        "on_node_configured": Field(_AROUND),
        "on_node_updated": Field(_AROUND),
    }
)
QUEUE_ACTIONS = Map(
    {
        "on_node_start": Field(List(_ACTION), default=list),
        "on_node_configured": Field(_AROUND),
    }
)
_POLICY_ARN = Str(pattern=r"arn:aws[a-z-]*:iam::(aws|\d{12}):policy/\S+", pattern_help="an IAM policy ARN")
NODE_IAM = Map({"additional_policies": Field(List(_POLICY_ARN, unique=True), default=list)})

CHECKPOINT = Map(
    {
        "enabled": Field(Bool(), default=True),
        # Transparent mode: the job_submit plugin runs every batch script of this queue under `ckpt run`.
        "transparent": Field(Bool(), default=False),
        # the settings agent.yaml has too, defined once (node/fields.py)
        "interval": F.INTERVAL,
        "keep": F.KEEP,
        "compression": F.COMPRESSION,
        "chunk_digest": F.CHUNK_DIGEST,
        "extra_paths": F.EXTRA_PATHS,
        "rebalance_action": F.REBALANCE_ACTION,
        "poll_interval": F.POLL_INTERVAL,
        "deadline_margin": F.DEADLINE_MARGIN,
        "staging_dir": F.STAGING_DIR,
        "stream": F.STREAM,
        "recent_periodic": F.RECENT_PERIODIC,
        "dirty_tracking": F.DIRTY_TRACKING,
        "ghost_limit": F.GHOST_LIMIT,
    },
    rules=[F.rule_extra_paths],
)

QUEUE = Map(
    {
        "name": Field(_NAME, required=True),
        "capacity": Field(Str(choices=("spot", "ondemand")), required=True),
        "instance_types": Field(List(_INSTANCE_TYPE, min_items=1, max_items=50, unique=True), required=True),
        "min_count": Field(Int(min=0, max=1000), default=0),
        "max_count": Field(Int(min=1, max=1000), default=10),
        "allocation_strategy": Field(Str(choices=ALL_STRATEGIES)),
        "subnet_id": Field(Str(pattern=r"subnet-([0-9a-z]{8}|[0-9a-z]{17})", pattern_help="a subnet id")),
        "checkpoint": Field(CHECKPOINT),
        "custom_actions": Field(QUEUE_ACTIONS),
        "iam": Field(NODE_IAM),
    },
    rules=[_rule_queue],
)

FSX_NEW = Map(
    {
        "deployment_type": Field(Str(choices=FSX_DEPLOYMENT_TYPES), default="PERSISTENT_2"),
        "storage_capacity_gib": Field(Int(min=1200, max=2_000_000), default=1200),
        "throughput_mb_s_per_tib": Field(Int(min=1)),
        "compression": Field(Str(choices=("LZ4", "NONE")), default="LZ4"),
        "deletion_policy": Field(Str(choices=("Delete", "Retain")), default="Retain"),
    },
    rules=[_rule_fsx_new],
)

# How users opt a job out of transparent mode (rendered into job_submit.lua): this keyword anywhere in the job's
# comment (`sbatch --comment=ckpt:off`, also as an #SBATCH line), or this variable set to 0/off/no/false in the
# environment sbatch exports.
TRANSPARENT = Map(
    {
        "opt_out_comment": Field(
            Str(pattern=r"[A-Za-z0-9_.:=+-]+", pattern_help="letters, digits and _.:=+- (no spaces)", max_len=64),
            default="ckpt:off",
        ),
        "opt_out_env": Field(
            Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*", pattern_help="an environment variable name", max_len=64),
            default="CKPT_TRANSPARENT",
        ),
    }
)

# CloudWatch metrics and dashboard, notifications (metrics.py, dashboard.py, notify.py)
MONITORING = Map(
    {
        "metrics": Field(Bool(), default=True),
        "namespace": F.NAMESPACE,
        "dashboard": Field(Bool(), default=True),
        "sns_topic_arn": F.SNS_TOPIC_ARN,
        "event_bus": F.EVENT_BUS,
        "dedupe_window": F.DEDUPE_WINDOW,
        "nodes_policy_arn": Field(Str(pattern=r"arn:aws[a-z-]*:iam::(\d{12}|aws):policy/[A-Za-z0-9+=,.@_/-]+",
                                      pattern_help="an IAM policy ARN")),
    },
    rules=[_rule_monitoring],
)

SITE = Map(
    {
        "cluster": Field(
            Map(
                {
                    "name": Field(
                        Str(pattern=r"[a-zA-Z][a-zA-Z0-9-]*", pattern_help="letters, digits and '-'", max_len=60),
                        required=True,
                    ),
                    "region": Field(
                        Str(pattern=r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d",
                            pattern_help="an AWS region like us-east-1"),
                        required=True,
                    ),
                    "os": Field(Str(choices=SUPPORTED_OSES), default="alinux2023"),
                    "custom_ami": Field(Str(pattern=r"ami-[0-9a-z]{8}([0-9a-z]{9})?", pattern_help="an AMI id")),
                    "subnet_id": Field(
                        Str(pattern=r"subnet-([0-9a-z]{8}|[0-9a-z]{17})", pattern_help="a subnet id"), required=True
                    ),
                    "key_name": Field(Str(max_len=255), required=True),
                    "tags": Field(AnyMap(Str(max_len=128), Str(min_len=0, max_len=256), max_items=40), default=dict),
                },
                rules=[_rule_cluster],
            ),
            required=True,
        ),
        "head_node": Field(
            Map(
                {
                    "instance_type": Field(_INSTANCE_TYPE, default="m6i.xlarge"),
                    "custom_actions": Field(HEAD_ACTIONS),
                    "iam": Field(NODE_IAM),
                }
            )
        ),
        "iam": Field(
            Map(
                {
                    # With the account id, the head node's cluster.yaml entry names the policy rendered into
                    # iam/head-node-policy.json (create it once with `aws iam create-policy`, see docs).
                    "account_id": Field(Str(pattern=r"\d{12}", pattern_help="a 12-digit AWS account id")),
                    "cloudwatch_namespace": Field(Str(pattern=r"[A-Za-z0-9/_.#:-]+",
                                                      pattern_help="a CloudWatch namespace"), default="CkptAgent"),
                }
            )
        ),
        "bundle": Field(
            Map(
                {
                    "bucket": Field(
                        Str(pattern=r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", pattern_help="an S3 bucket name"),
                        required=True,
                    ),
                    "prefix": Field(
                        Str(pattern=r"[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*",
                            pattern_help="an S3 key prefix without leading or trailing '/'"),
                        default="ckpt-agent",
                    ),
                    "pythons": Field(List(Str(), min_items=1, unique=True), default=lambda: list(SUPPORTED_PYTHONS)),
                    "architectures": Field(List(Str(choices=SUPPORTED_ARCHITECTURES), min_items=1, unique=True),
                                           default=lambda: list(SUPPORTED_ARCHITECTURES)),
                },
                rules=[_rule_bundle],
            ),
            required=True,
        ),
        "storage": Field(
            Map(
                {
                    "name": Field(Str(pattern=r"[A-Za-z0-9_-]+", pattern_help="letters, digits, '_', '-'", max_len=30),
                                  default="checkpoints"),
                    "mount_dir": Field(Str(pattern=r"/.*", pattern_help="an absolute path"), default="/fsx"),
                    "checkpoint_dir": Field(Str(), default="ckpt"),
                    "new": Field(FSX_NEW, fill=False),
                    "existing_file_system_id": Field(
                        Str(pattern=r"fs-[0-9a-z]{17}", pattern_help="an FSx id like fs-0123456789abcdef0")
                    ),
                },
                rules=[_rule_storage],
            ),
            required=True,
        ),
        "criu": Field(
            Map(
                {
                    "version": Field(Str(pattern=r"\d+\.\d+(\.\d+)?", pattern_help="a version like 4.2.1"),
                                     default=DEFAULT_CRIU_VERSION),
                    "source": Field(Str()),
                    "sha256": Field(Str(pattern=r"[0-9a-f]{64}", pattern_help="64 lowercase hex digits")),
                    "preinstalled": Field(Bool(), default=False),
                },
                rules=[_rule_criu],
            )
        ),
        "cleanup": Field(
            Map(
                {
                    "schedule": Field(Str(), default="*/15 * * * *"),
                    "grace": F.GRACE,  # these five are agent.yaml's gc settings (node/fields.py)
                    "max_age": F.MAX_AGE,
                    "history_max_age": F.HISTORY_MAX_AGE,
                    "high_watermark": F.HIGH_WATERMARK,
                    "low_watermark": F.LOW_WATERMARK,
                },
                rules=[_rule_cleanup],
            )
        ),
        "slurm": Field(
            Map(
                {
                    "scaledown_idletime": Field(Int(min=-1, max=10080), default=10),
                    # ParallelCluster builds Slurm with --prefix=/opt/slurm; units and timers put this on PATH.
                    "bin_dir": Field(Str(pattern=r"/.*", pattern_help="an absolute path"), default="/opt/slurm/bin"),
                    # How a queue-level change (custom actions, instance types) reaches running compute nodes.
                    "queue_update_strategy": Field(Str(choices=("DRAIN", "TERMINATE", "COMPUTE_FLEET_STOP")),
                                                   default="DRAIN"),
                    "settings": Field(
                        AnyMap(Str(pattern=r"[A-Za-z][A-Za-z0-9]*", pattern_help="a slurm.conf parameter name"),
                               Scalar()),
                        default=dict,
                    ),
                },
                rules=[_rule_slurm],
            )
        ),
        "prices": Field(
            AnyMap(_INSTANCE_TYPE, F.PRICE),
            default=dict,
        ),
        "transparent": Field(TRANSPARENT),
        "queues": Field(List(QUEUE, min_items=1, max_items=MAX_QUEUES), required=True),
        "monitoring": Field(MONITORING),
    },
    rules=[_rule_site],
)


def read_text(path: str) -> str:
    try:
        return read_config_text(path, "site file")
    except FileNotFoundError:
        raise ConfigError(f"{path}: site file not found") from None


def check_site_text(text: str, source: str):
    """(site data with defaults, problems) for the text of a site file; ConfigError when it is not YAML."""
    data, lines = load_yaml_with_lines(text, source)
    if data is None:
        data = {}
    site, problems = validate(data, SITE, source, lines)
    return site, problems


def load_site(path: str) -> Dict[str, Any]:
    """The validated site file at `path` with defaults filled in; SiteInvalid lists every problem."""
    site, problems = check_site_text(read_text(path), path)
    if problems:
        raise SiteInvalid(path, problems)
    return site
