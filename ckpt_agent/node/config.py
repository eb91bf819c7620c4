"""The node-side configuration, `agent.yaml`: what `ckpt run`, `ckpt agent` and `ckpt gc` read.

`ckpt render` writes one per queue from the admin's site file. Every key has a default, so a machine with no file
(tests, the demo) runs on defaults and the environment. Unknown keys and wrong types are errors naming the key path.

Precedence, highest first: command-line flags, environment ($CKPT_STORE, $CKPT_RUNTIME_DIR,
$AWS_EC2_METADATA_SERVICE_ENDPOINT), the file (--config, else $CKPT_CONFIG, else /etc/ckpt-agent/agent.yaml).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from ckpt_agent.errors import ConfigError
from ckpt_agent.util.yamlschema import Lines, load_yaml_with_lines, read_config_text

DEFAULT_CONFIG_PATH = "/etc/ckpt-agent/agent.yaml"
DEFAULT_RUNTIME_DIR = "/run/ckpt-agent"
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
DEFAULT_PRICES_FILE = "/var/lib/ckpt-agent/prices.json"


@dataclass
class CheckpointSettings:
    interval: int = 900  # seconds between periodic checkpoints; 15 min bounds lost work at a few % of a long job
    keep: int = 2  # committed generations kept per step: the newest plus one fallback if it turns out damaged
    compression: str = "zstd"  # zstd | none; zstd is applied per chunk only where it saves space
    staging_dir: str = "auto"  # where CRIU writes images before they enter the store; auto = tmpfs if RAM allows
    stream: str = "auto"  # auto | always | off: images stream into the store as CRIU dumps (streamdump.stream_dump)
    extra_paths: list = field(default_factory=list)  # more directories captured with the working directory
    ghost_limit: str = "1G"  # deleted-but-open temp files up to this size are saved (CRIU's default 1 MiB is too small)
    tcp_close: bool = True  # restore TCP connections closed: a license-server client reconnects from the new IP


@dataclass
class AgentSettings:
    poll_interval: float = 2.0  # IMDS polls per notice window: 2 s wastes under 2% of the 120 s notice
    deadline_margin: int = 20  # seconds before the reclaim time reserved for unmounting FSx
    rebalance_action: str = "checkpoint"  # checkpoint | drain | ignore
    max_parallel: int = 4  # final checkpoints run at once; more only splits the store's bandwidth
    imds_endpoint: str = DEFAULT_IMDS_ENDPOINT
    socket: str = ""  # the agent's Unix socket; default <runtime_dir>/agent.sock
    key_file: str = "/etc/ckpt-agent/node.key"  # HMAC key for manifests, readable by root only
    # Slurm node features that stand for one CPU family each ("r6i.4xlarge|r6i.8xlarge"): a job requeued after a
    # final checkpoint here is constrained to this node's family, where CRIU's CPU check passes. Empty: no constraint.
    cpu_families: list = field(default_factory=list)


@dataclass
class GcSettings:
    grace: int = 3600
    max_age: int = 14 * 24 * 3600
    high_watermark: float = 85.0
    low_watermark: float = 75.0
    # {partition: generations kept}: each queue's checkpoint.keep, for the head node's gc (the job's partition
    # decides; partitions not listed use checkpoint.keep)
    queue_keep: Dict[str, int] = field(default_factory=dict)


@dataclass
class MonitoringSettings:
    """Where events go besides the events file: CloudWatch metrics (metrics.py) and notifications (notify.py)."""
    cluster: str = ""  # the ClusterName dimension and the notification's cluster
    region: str = ""  # AWS region of CloudWatch, SNS and EventBridge; empty = the AWS SDK's default
    metrics: bool = False  # publish lifecycle metrics to CloudWatch
    namespace: str = "CkptAgent"
    sns_topic_arn: str = ""  # notifications for what needs a human (failed or late final checkpoints, ...)
    event_bus: str = ""  # ... or to this EventBridge bus
    dedupe_window: int = 3600  # the same job and cause is notified once per window (seconds)
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


_ENUMS = {
    "checkpoint.compression": ("zstd", "none"),
    "checkpoint.stream": ("auto", "always", "off"),
    "agent.rebalance_action": ("checkpoint", "drain", "ignore"),
}
_MINIMUMS = {
    "checkpoint.interval": 10,
    "checkpoint.keep": 1,
    "agent.poll_interval": 0.1,
    "agent.deadline_margin": 0,
    "agent.max_parallel": 1,
    "gc.grace": 0,
    "gc.max_age": 0,
    "monitoring.dedupe_window": 0,
    "monitoring.timeout": 0.1,
}


# upper bounds: a year for every interval and duration (larger values overflow timers and kill threads)
_MAX_NUMBER = 365 * 24 * 3600
_MAXIMUMS = {
    "agent.max_parallel": 1024,
    "gc.high_watermark": 100.0,
    "gc.low_watermark": 100.0,
}


class _Problems:
    """Every problem found in one file, each as `FILE:LINE: key.path: message` (STYLE.md: report them together)."""

    def __init__(self, source: str, lines: Optional[Lines]):
        self.source = source
        self.lines = lines
        self.items: List[str] = []

    def add(self, path: Tuple[str, ...], message: str, key: bool = False) -> None:
        where = self.source
        if self.lines is not None:
            line = self.lines.of_key(path) if key else self.lines.of_value(path)
            where = f"{self.source}:{line}"
        self.items.append(f"{where}: {'.'.join(path) or 'top level'}: {message}")


def _apply(obj: Any, data: Any, path: Tuple[str, ...], problems: _Problems) -> None:
    if not isinstance(data, dict):
        problems.add(path, f"must be a mapping, got {type(data).__name__}")
        return
    known = {f.name: f for f in fields(obj) if f.name != "source"}
    for key, value in data.items():
        where = path + (str(key),)
        if key not in known:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            problems.add(where, "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""), key=True)
            continue
        current = getattr(obj, key)
        if hasattr(current, "__dataclass_fields__"):
            _apply(current, value, where, problems)
            continue
        try:
            setattr(obj, key, _coerce(current, value, ".".join(where)))
        except ValueError as e:
            problems.add(where, str(e))


def _coerce(current: Any, value: Any, where: str) -> Any:
    def bad(expected: str) -> ValueError:
        return ValueError(f"must be {expected}, got {value!r}")

    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        if isinstance(current, int) and not isinstance(current, bool) and value != int(value):
            raise bad("a whole number")
        value = type(current)(value)
        low = _MINIMUMS.get(where)
        if low is not None and value < low:
            raise ValueError(f"must be >= {low:g}, got {value:g}")
        high = _MAXIMUMS.get(where, _MAX_NUMBER)
        if value > high:
            raise ValueError(f"must be <= {high:g}, got {value:g}")
        return value
    if isinstance(current, str):
        if not isinstance(value, str):
            raise bad("a string")
        allowed = _ENUMS.get(where)
        if allowed and value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value
    if isinstance(current, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return value
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise bad("a mapping")
        if where == "prices":
            for itype, p in value.items():
                if not isinstance(p, dict) or not all(
                        k in ("spot", "ondemand") and not isinstance(v, bool) and isinstance(v, (int, float))
                        and math.isfinite(v) and v >= 0 for k, v in p.items()):
                    raise ValueError(f"{itype}: must be a mapping of spot and ondemand to finite prices >= 0, "
                                     f"got {p!r}")
        if where == "gc.queue_keep" and not all(
            isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 1 for k, n in value.items()
        ):
            raise bad("a mapping of partition names to whole numbers >= 1")
        return value
    return value


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
            problems = _Problems(chosen, lines)
            _apply(cfg, data, (), problems)
            if problems.items:
                raise ConfigError("; ".join(problems.items))
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
