"""Settings that both configuration files declare, defined once: the site file (site/schema.py: a queue's
`checkpoint`, `cleanup`, `monitoring`, `prices`) and the node's agent.yaml that `ckpt render` writes from it
(node/config.py: `checkpoint`, `agent`, `gc`, `monitoring`, `prices`). Both schemas use these Field objects, and the
node's dataclass defaults are their defaults, so the limits and defaults agree by construction: an agent.yaml rendered
from a valid site file is valid.

Limits are what the software needs, not site policy: the local development cluster (ckpt_dev) runs 10 s checkpoint
intervals and a 0.5 s IMDS poll, and a site may do the same.
"""

from __future__ import annotations

import posixpath
from typing import Any, Dict

from ckpt_agent.node.actions import DEFAULT_REBALANCE_ACTION, REBALANCE_ACTIONS
from ckpt_agent.store.layout import CHUNK_DIGESTS
from ckpt_agent.util.yamlschema import Bool, Context, Duration, Field, Float, Int, List, Map, Path, Str

YEAR = 365 * 24 * 3600  # the largest interval or duration anywhere (larger values overflow timers)

# -- how a job checkpoints (site: queues[].checkpoint; node: checkpoint) ----------------------------------------
INTERVAL = Field(Duration(min=10, max=7 * 86400), default=900)  # 15 min bounds lost work at a few % of a long job
KEEP = Field(Int(min=1, max=10), default=2)  # the newest plus one fallback if it turns out damaged
COMPRESSION = Field(Str(choices=("zstd", "none")), default="zstd")  # zstd only where it saves space, per chunk
# what names the chunks a checkpoint writes (store/chunks.py): BLAKE3, 4-5x the speed of sha256 on one core; sha256
# where site policy admits only FIPS-approved hashes. A restore accepts chunks named by either.
CHUNK_DIGEST = Field(Str(choices=CHUNK_DIGESTS), default=CHUNK_DIGESTS[0])
EXTRA_PATHS = Field(List(Str(), unique=True), default=list)  # more directories captured with the working directory
STAGING_DIR = Field(Str(), default="auto")  # where CRIU writes images before the store; auto = tmpfs if RAM allows
# whether images stream into the store as CRIU dumps (checkpoint/streamdump.py: auto streams finals and restores)
STREAM_MODES = ("auto", "always", "off")
STREAM = Field(Str(choices=STREAM_MODES), default="auto")
# whether a dump sends only the pages written since the previous checkpoint where this node can tell (adapters/uffd.py:
# userfaultfd write-protection, Linux >= 6.13 on x86_64, with CRIU patches 0002 and 0004; else adapters/softdirty.py:
# soft-dirty bits, with patch 0003); false: every dump reads every page
DIRTY_TRACKING = Field(Bool(), default=True)
# on a notice, a periodic checkpoint younger than this stands in for a final checkpoint that cannot fit the time left
# (the job is requeued from it at once); absent: one checkpoint interval; 0: always try the final checkpoint
RECENT_PERIODIC = Field(Duration(min=0, max=7 * 86400))
# deleted-but-open temp files up to this size are saved (CRIU's default 1 MiB is too small)
GHOST_LIMIT = Field(Str(pattern=r"\d+[KMG]?", pattern_help="a size like 64M or 1G"), default="1G")

# -- how the node agent reacts (site: queues[].checkpoint; node: agent) -------------------------------------------
REBALANCE_ACTION = Field(Str(choices=tuple(REBALANCE_ACTIONS)), default=DEFAULT_REBALANCE_ACTION)
POLL_INTERVAL = Field(Float(min=0.1, max=30, unit="s"), default=2.0)  # 2 s wastes under 2% of the 120 s notice
DEADLINE_MARGIN = Field(Duration(min=0, max=100), default=20)  # seconds before the reclaim kept for unmounting FSx

# -- what gc removes (site: cleanup; node: gc) --------------------------------------------------------------------
GRACE = Field(Duration(min=0, max=YEAR), default=3600)
MAX_AGE = Field(Duration(min=3600, max=YEAR), default=14 * 86400)
# the events of removed jobs kept in <store>/.history for `ckpt report`: about a year and a month, so a yearly report
# still sees every job
HISTORY_MAX_AGE = Field(Duration(min=86400, max=5 * YEAR), default=400 * 86400)
HIGH_WATERMARK = Field(Float(min=1, max=100, unit="%"), default=85.0)
LOW_WATERMARK = Field(Float(min=0, max=99, unit="%"), default=75.0)

# -- monitoring and prices (site: monitoring, prices; node: monitoring, prices) -----------------------------------
NAMESPACE = Field(Str(pattern=r"[A-Za-z0-9._/#:-]{1,255}", pattern_help="a CloudWatch namespace"), default="CkptAgent")
SNS_TOPIC_ARN = Field(Str(pattern=r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?",
                          pattern_help="an SNS topic ARN"))
EVENT_BUS = Field(Str(pattern=r"[A-Za-z0-9._/-]{1,256}|arn:aws[a-z-]*:events:[a-z0-9-]+:\d{12}:"
                              r"event-bus/[A-Za-z0-9._/-]{1,256}",
                      pattern_help="an EventBridge bus name or ARN"))
DEDUPE_WINDOW = Field(Duration(min=0, max=7 * 86400), default=3600)  # a job's cause is notified once per window
INSTANCE_TYPE = Str(pattern=r"[a-z0-9]+[a-z0-9-]*\.[a-z0-9-]+", pattern_help="an EC2 instance type like r6i.4xlarge")
PRICE = Map({"spot": Field(Float(min=0), required=True), "ondemand": Field(Float(min=0), required=True)})


# -- rules both files apply -----------------------------------------------------------------------------------------

def rule_extra_paths(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    for i, p in enumerate(d.get("extra_paths") or []):
        if not p.startswith("/") or posixpath.normpath(p) != p:
            ctx.error(path + ("extra_paths", i), f"must be a normalized absolute path, got {p!r}")


def rule_watermarks(d: Dict[str, Any], path: Path, ctx: Context) -> None:
    low, high = d.get("low_watermark"), d.get("high_watermark")
    if low is not None and high is not None and low >= high:
        ctx.error(path + ("low_watermark",), f"must be below high_watermark ({high:g}), got {low:g}")
