"""`ckpt prices [--update [--region R] [--instance-types T ...]]`: show, or refresh through AWS, the price table
`ckpt report` uses (USD per instance-hour at Spot and On-Demand).

Without --update it prints the table in effect: the config's `prices`, overridden per type by the file
`prices_file` (default /var/lib/ckpt-agent/prices.json) that --update writes. Exit codes: 0, 2 usage (no region or
no instance types), 78 configuration, 80 an AWS call failed.
"""

from __future__ import annotations

import argparse
import json
import os

from ckpt_agent.adapters.aws_prices import (
    AwsPrices,
    clients,
    effective_prices,
    read_table,
    write_table,
)
from ckpt_agent.commands._common import add_config_args, load
from ckpt_agent.errors import UsageError

HELP = "show the Spot/On-Demand price table, or refresh it from AWS with --update"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, store=False)
    parser.add_argument("--update", action="store_true", help="fetch current prices through the AWS APIs")
    parser.add_argument("--region", metavar="R", help="region to price (default: $AWS_REGION, $AWS_DEFAULT_REGION, "
                                                      "else the region of the existing table)")
    parser.add_argument("--instance-types", metavar="TYPE", nargs="+",
                        help="instance types to price (default: those already in the table and the config)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def main(args: argparse.Namespace) -> int:
    cfg = load(args)
    path = cfg.prices_file
    if args.update:
        current = read_table(path)
        region = args.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or current.get("region")
        if not region:
            raise UsageError("no region to price: pass --region R or set AWS_REGION")
        types = args.instance_types or sorted(set(cfg.prices) | set(current.get("prices") or {}))
        if not types:
            raise UsageError("no instance types to price: pass --instance-types TYPE ... (none in the table yet)")
        ec2, pricing = clients(region)
        table = AwsPrices(ec2, pricing, region).table(types)
        merged = dict(current.get("prices") or {}) if current.get("region") == region else {}
        merged.update(table)
        write_table(path, merged, region)
        print(f"wrote prices of {len(table)} instance type(s) in {region} to {path}")
    table, sources = effective_prices(cfg.prices, path)
    if args.json:
        print(json.dumps({"prices": table, "sources": sources}, indent=2, sort_keys=True))
        return 0
    if not table:
        print(f"no prices: set 'prices' in {cfg.source} or run `ckpt prices --update --region R "
              "--instance-types TYPE ...`")
        return 0
    print(f"{'INSTANCE TYPE':<16} {'SPOT $/h':>10} {'ON-DEMAND $/h':>14} {'SAVING':>7}  SOURCE")
    for itype in sorted(table):
        p = table[itype]
        spot, od = p.get("spot"), p.get("ondemand")
        saving = f"{100 * (1 - spot / od):.0f}%" if spot is not None and od else "-"
        print(f"{itype:<16} {_num(spot):>10} {_num(od):>14} {saving:>7}  {sources.get(itype, '')}")
    return 0


def _num(v) -> str:
    return "-" if v is None else f"{float(v):.4f}"
