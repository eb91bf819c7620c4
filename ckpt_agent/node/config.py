"""The node-side configuration, `agent.yaml`: what `ckpt run`, `ckpt agent` and `ckpt gc` read.

`ckpt render` writes one per queue from the admin's site file. Every key has a default, so a machine with no file
(tests, the demo) runs on defaults and the environment. The file is checked with the site file's schema engine
(util/yamlschema.py) and the settings both files have are defined once (node/fields.py), so the limits agree. Every
problem is reported together, each as `FILE:LINE: key.path: message` (unknown keys with a "did you mean" hint), in one
ConfigError (exit 78).

Precedence, highest first: command-line flags, environment ($CKPT_STORE, $CKPT_RUNTIME_DIR,
$AWS_EC2_METADATA_SERVICE_ENDPOINT), the file (--config, else $CKPT_CONFIG, else /etc/ckpt-agent/agent.yaml).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from ckpt_agent.errors import ConfigError
from ckpt_agent.node import fields as F
from ckpt_agent.util.yamlschema import (
    AnyMap,
    Bool,
    Field,
    Float,
    Int,
    List,
    Map,
    Str,
    load_yaml_with_lines,
    read_config_text,
    validate,
)

DEFAULT_CONFIG_PATH = "/etc/ckpt-agent/agent.yaml"
DEFAULT_RUNTIME_DIR = "/run/ckpt-agent"
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
DEFAULT_PRICES_FILE = "/var/lib/ckpt-agent/prices.json"


@dataclass
class CheckpointSettings:
    interval: int = F.INTERVAL.default
    keep: int = F.KEEP.default
    compression: str = F.COMPRESSION.default
    chunk_digest: str = F.CHUNK_DIGEST.default  # blake3 | sha256: what names new chunks (store/chunks.py)
    staging_dir: str = F.STAGING_DIR.default
    stream: str = F.STREAM.default  # auto | always | off: images stream into the store as CRIU dumps (streamdump.py)
    recent_periodic: Optional[int] = None  # see node/fields.py RECENT_PERIODIC (None: one interval)
    dirty_tracking: bool = F.DIRTY_TRACKING.default  # dumps send only the pages written since, where possible
    extra_paths: list = field(default_factory=list)
    ghost_limit: str = F.GHOST_LIMIT.default
    tcp_close: bool = True  # restore TCP connections closed: a license-server client reconnects from the new IP


@dataclass
class AgentSettings:
    poll_interval: float = F.POLL_INTERVAL.default
    deadline_margin: int = F.DEADLINE_MARGIN.default
    rebalance_action: str = F.REBALANCE_ACTION.default  # a key of node/actions.py REBALANCE_ACTIONS
    max_parallel: int = 4  # final checkpoints run at once; more only splits the store's bandwidth
    imds_endpoint: str = DEFAULT_IMDS_ENDPOINT
    socket: str = ""  # the agent's Unix socket; default <runtime_dir>/agent.sock
    key_file: str = "/etc/ckpt-agent/node.key"  # HMAC key for manifests, readable by root only
    # Slurm node features that stand for one CPU family each ("r6i.4xlarge|r6i.8xlarge"): a job requeued after a
    # final checkpoint here is constrained to this node's family, where CRIU's CPU check passes. Empty: no constraint.
    cpu_families: list = field(default_factory=list)


@dataclass
class GcSettings:
    grace: int = F.GRACE.default
    max_age: int = F.MAX_AGE.default
    history_max_age: int = F.HISTORY_MAX_AGE.default
    high_watermark: float = F.HIGH_WATERMARK.default
    low_watermark: float = F.LOW_WATERMARK.default
    # {partition: generations kept}: each queue's checkpoint.keep, for the head node's gc (the job's partition
    # decides; partitions not listed use checkpoint.keep)
    queue_keep: Dict[str, int] = field(default_factory=dict)


@dataclass
class MonitoringSettings:
    """Where events go besides the events file: CloudWatch metrics (metrics.py) and notifications (notify.py)."""
    cluster: str = ""  # the ClusterName dimension and the notification's cluster
    region: str = ""  # AWS region of CloudWatch, SNS and EventBridge; empty = the AWS SDK's default
    metrics: bool = False  # publish lifecycle metrics to CloudWatch
    namespace: str = F.NAMESPACE.default
    sns_topic_arn: str = ""  # notifications for what needs a human (failed or late final checkpoints, ...)
    event_bus: str = ""  # ... or to this EventBridge bus
    dedupe_window: int = F.DEDUPE_WINDOW.default  # the same job and cause is notified once per window (seconds)
    timeout: float = 5.0  # per AWS call, in the background; also the most the wrapper waits at exit to flush
    endpoint_url: str = ""  # another endpoint for all three services (tests, VPC endpoints)


@dataclass
class AgentConfig:
    store: str = ""
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    queue: str = ""
    cluster: str = ""  # the ParallelCluster cluster name: the CloudWatch dimension of `ckpt report --cloudwatch`
    criu: str = "criu"
    # where scontrol, squeue and sacct are; "" = /opt/slurm/bin when it has them (ParallelCluster), else PATH
    slurm_bin_dir: str = ""
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    gc: GcSettings = field(default_factory=GcSettings)
    monitoring: MonitoringSettings = field(default_factory=MonitoringSettings)
    prices: Dict[str, Dict[str, float]] = field(default_factory=dict)
    # where `ckpt prices --update` writes the refreshed table and `ckpt report` reads it (over `prices`)
    prices_file: str = DEFAULT_PRICES_FILE
    source: str = "<defaults>"

    @property
    def socket_path(self) -> str:
        return self.agent.socket or os.path.join(self.runtime_dir, "agent.sock")


# ---- the schema: the shared fields (node/fields.py) plus the node's own ------------------------------------------

_TEXT = Str(min_len=0)  # free text, may be empty (the dataclass default says what empty means)


def _section(cls: type, specs: Dict[str, Any], rules=()) -> Map:
    """A Map of `cls`'s fields: each spec (a Spec, or a shared Field whose spec is used) with the dataclass's default.
    Every dataclass field needs a spec and every spec a field: a mismatch is a bug, caught at import."""
    names = [f.name for f in fields(cls) if f.name != "source"]
    assert sorted(names) == sorted(specs), (cls.__name__, sorted(set(names) ^ set(specs)))
    blank = cls()
    out: Dict[str, Field] = {}
    for name in names:
        spec = specs[name]
        value = getattr(blank, name)
        spec = spec.spec if isinstance(spec, Field) else spec
        if isinstance(spec, Map):  # an absent section: the Map fills in its own defaults
            out[name] = Field(spec)
        elif isinstance(value, (list, dict)):
            out[name] = Field(spec, default=lambda v=value: copy.deepcopy(v))
        else:
            out[name] = Field(spec, default=value)
    return Map(out, rules=rules)


CHECKPOINT = _section(CheckpointSettings, {
    "interval": F.INTERVAL, "keep": F.KEEP, "compression": F.COMPRESSION, "chunk_digest": F.CHUNK_DIGEST,
    "staging_dir": F.STAGING_DIR,
    "stream": F.STREAM, "recent_periodic": F.RECENT_PERIODIC, "dirty_tracking": F.DIRTY_TRACKING,
    "extra_paths": F.EXTRA_PATHS, "ghost_limit": F.GHOST_LIMIT, "tcp_close": Bool(),
}, rules=[F.rule_extra_paths])
AGENT = _section(AgentSettings, {
    "poll_interval": F.POLL_INTERVAL, "deadline_margin": F.DEADLINE_MARGIN, "rebalance_action": F.REBALANCE_ACTION,
    "max_parallel": Int(min=1, max=1024), "imds_endpoint": Str(), "socket": _TEXT, "key_file": Str(),
    "cpu_families": List(Str(), unique=True),
})
GC = _section(GcSettings, {
    "grace": F.GRACE, "max_age": F.MAX_AGE, "history_max_age": F.HISTORY_MAX_AGE,
    "high_watermark": F.HIGH_WATERMARK, "low_watermark": F.LOW_WATERMARK,
    "queue_keep": AnyMap(Str(), F.KEEP.spec),
}, rules=[F.rule_watermarks])
MONITORING = _section(MonitoringSettings, {
    "cluster": _TEXT, "region": _TEXT, "metrics": Bool(), "namespace": F.NAMESPACE,
    "sns_topic_arn": F.SNS_TOPIC_ARN, "event_bus": F.EVENT_BUS,
    "dedupe_window": F.DEDUPE_WINDOW, "timeout": Float(min=0.1, max=3600, unit="s"), "endpoint_url": _TEXT,
})
AGENT_SCHEMA = _section(AgentConfig, {
    "store": _TEXT, "runtime_dir": Str(), "queue": _TEXT, "cluster": _TEXT, "criu": Str(), "slurm_bin_dir": _TEXT,
    "checkpoint": CHECKPOINT, "agent": AGENT, "gc": GC, "monitoring": MONITORING,
    "prices": AnyMap(F.INSTANCE_TYPE, F.PRICE), "prices_file": Str(),
})


def _build(cls: type, data: Dict[str, Any]) -> Any:
    """The dataclass `cls` from validated data (nested sections become their dataclasses)."""
    blank = cls()
    values = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        current = getattr(blank, f.name)
        values[f.name] = _build(type(current), data[f.name]) if hasattr(current, "__dataclass_fields__") \
            else data[f.name]
    return cls(**values)


def load_agent_config(path: Optional[str] = None, *, required: bool = False) -> AgentConfig:
    """Load agent.yaml from `path`, $CKPT_CONFIG or the default location; apply environment overrides.

    A missing file is fine (defaults) unless the path was given explicitly or `required` is set.
    """
    explicit = path or os.environ.get("CKPT_CONFIG")
    chosen = explicit or DEFAULT_CONFIG_PATH
    cfg = AgentConfig()
    try:
        text: Optional[str] = read_config_text(chosen)  # regular, bounded, UTF-8: else one ConfigError line
    except FileNotFoundError:
        if explicit or required:
            raise ConfigError(f"{chosen}: configuration file not found") from None
        text = None
    if text is not None:
        data, lines = load_yaml_with_lines(text, chosen)  # malformed YAML: ConfigError naming FILE:LINE
        cfg.source = chosen
        if data is not None:
            converted, problems = validate(data, AGENT_SCHEMA, chosen, lines)
            if problems:  # every problem, each `FILE:LINE: key.path: message`
                raise ConfigError("; ".join(map(str, problems)))
            cfg = _build(AgentConfig, converted)
            cfg.source = chosen
    if os.environ.get("CKPT_STORE"):
        cfg.store = os.environ["CKPT_STORE"]
    if os.environ.get("CKPT_RUNTIME_DIR"):
        cfg.runtime_dir = os.environ["CKPT_RUNTIME_DIR"]
    if os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        cfg.agent.imds_endpoint = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
    return cfg


def require_store(cfg: AgentConfig, flag_value: Optional[str]) -> str:
    """The store root: --store, else $CKPT_STORE/config; a clear error when none is set."""
    store = flag_value or cfg.store
    if not store:
        raise ConfigError(
            f"no checkpoint store configured: pass --store DIR, set $CKPT_STORE, or set 'store' in {cfg.source}"
        )
    return store
