"""`ckpt plan SITE.yaml`: will a final checkpoint fit inside the Spot notice, per queue, and if not, what would make
it fit (the model is in ckpt_agent/checkpoint/planner.py)."""

from __future__ import annotations

import argparse
import json
import math

from ckpt_agent.checkpoint.planner import (
    DEFAULT_DUMP_GIB_S,
    DEFAULT_SCAN_GIB_S,
    advice,
    load_measured,
    measured_inputs,
    plan_site,
)
from ckpt_agent.commands._common import load_site_or_print
from ckpt_agent.errors import EXIT_USAGE, UsageError

HELP = "predict each queue's final-checkpoint time against the Spot notice, and the FSx throughput that would fit"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("site", metavar="SITE.yaml", help="the site file")
    parser.add_argument("--job-memory", type=_positive, metavar="GIB",
                        help="memory of the largest job (default: 90%% of the queue's smallest instance type)")
    parser.add_argument("--reclaimed", type=_positive, default=0.25, metavar="SHARE",
                        help="share of a queue's nodes reclaimed at once, (0, 1] (default 0.25)")
    parser.add_argument("--changed", type=_positive, default=1.0, metavar="SHARE",
                        help="share of the job's memory a final checkpoint writes (default 1: a full checkpoint)")
    parser.add_argument("--compression", type=_positive, default=1.0, metavar="RATIO",
                        help="how much smaller the stored data is (default 1: no gain)")
    parser.add_argument("--measured", metavar="FILE",
                        help="the figures one node measured: `bench/checkpoint_bench.py --plan-inputs FILE` on it, "
                             "with --dir on the cluster's FSx (the options below override them one by one)")
    parser.add_argument("--store-mb-s", type=_positive, metavar="MB/S",
                        help="store write bandwidth one node measured (bench/checkpoint_bench.py on the cluster)")
    parser.add_argument("--dump-gib-s", type=_positive, metavar="GIB/S",
                        help=f"CRIU's dump rate of the pages it reads (default {DEFAULT_DUMP_GIB_S:g})")
    parser.add_argument("--scan-gib-s", type=_positive, metavar="GIB/S",
                        help="memory an incremental final with dirty tracking walks per second for the written pages "
                             f"(default {DEFAULT_SCAN_GIB_S:g})")
    parser.add_argument("--node-network", type=_positive, metavar="GBIT/S", help="a node's network bandwidth")
    parser.add_argument("--fsx-mb-s", type=_positive, metavar="MB/S",
                        help="the file system's total throughput (needed for an existing file system)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    site = load_site_or_print(args.site)
    if site is None:
        return EXIT_USAGE
    if args.reclaimed > 1 or args.changed > 1:
        raise UsageError("--reclaimed and --changed are shares: at most 1")
    measured = load_measured(args.measured) if args.measured else {}
    inputs = measured_inputs(measured, store_mb_s=args.store_mb_s, dump_gib_s=args.dump_gib_s,
                             scan_gib_s=args.scan_gib_s, job_memory_gib=args.job_memory,
                             reclaimed_share=args.reclaimed, changed_share=args.changed,
                             compression_ratio=max(1.0, args.compression), node_network_gbit=args.node_network,
                             fsx_mb_s=args.fsx_mb_s)
    plans = plan_site(site, inputs)
    if args.json:
        print(json.dumps([p.to_json() for p in plans], indent=2))
        return 0
    if measured:
        print(f"node figures ({args.measured}: {measured['where']}, {measured['when']}; options override them): store "
              f"{inputs.store_mb_s:,.0f} MB/s, dump {inputs.dump_gib_s:g} GiB/s, "
              + (f"dirty tracking, scan {inputs.scan_gib_s:g} GiB/s" if inputs.dirty_tracking
                 else "no dirty tracking (every page read)"))
    print(f"FSx throughput {plans[0].fsx_mb_s:,.0f} MB/s; {args.reclaimed:g} of each queue's nodes reclaimed at once"
          if plans else "no queue checkpoints")
    for p in plans:
        print(f"{p.queue}: {p.job_memory_gib:g} GiB job on {p.instance_type}, {p.nodes_at_once} node(s) at once, "
              f"dump {p.dump_seconds:g} s{' (written pages only)' if p.dirty_tracking else ''}, "
              f"{p.write_gib:g} GiB to write at {p.node_mb_s:,.0f} MB/s per node -> {advice(p, site)}")
    return 0
