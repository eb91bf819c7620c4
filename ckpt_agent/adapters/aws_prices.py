"""Instance prices: the AWS adapter that fetches them and the price table file `ckpt report` reads.

`AwsPrices(ec2, pricing)` takes boto3 clients (tests pass moto-backed or stubbed ones):
- Spot: EC2 DescribeSpotPriceHistory for Linux/UNIX since now, i.e. the price in force in each availability zone;
  the table keeps the mean over the zones and the per-zone prices.
- On-Demand: the Pricing API's GetProducts (served from us-east-1 whatever the region priced) for Linux, shared
  tenancy, no pre-installed software, capacity status "Used": the hourly USD price.
Every botocore error becomes an AwsError naming the call (adapters/aws.py, exit 80).

The price table file (JSON, written atomically):
    {"generated": "<ISO UTC>", "region": "us-east-1", "source": "ckpt prices --update",
     "prices": {"c6i.large": {"spot": 0.0331, "ondemand": 0.085, "spot_by_zone": {"us-east-1a": 0.0329, ...}}}}
The report reads the config's `prices` and then this file; for a type in both, the file wins (it is newer).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from typing import Any, Dict, Iterable, Optional, Tuple

from ckpt_agent.adapters.aws import aws_call
from ckpt_agent.errors import ConfigError
from ckpt_agent.util.safeio import write_atomic
from ckpt_agent.util.units import iso_seconds

log = logging.getLogger(__name__)

PRICING_REGION = "us-east-1"  # the Pricing API has endpoints in us-east-1 (and ap-south-1), not in every region
SPOT_PRODUCT = "Linux/UNIX"
PriceTable = Dict[str, Dict[str, Any]]


class AwsPrices:
    def __init__(self, ec2, pricing, region: str):
        self.ec2 = ec2
        self.pricing = pricing
        self.region = region

    def spot(self, instance_types: Iterable[str], now: Optional[dt.datetime] = None) -> Dict[str, Dict[str, float]]:
        """{type: {zone: USD per hour}}: the newest price per zone."""
        now = now or dt.datetime.now(dt.timezone.utc)
        newest: Dict[Tuple[str, str], Tuple[dt.datetime, float]] = {}
        token = ""
        while True:
            kwargs: Dict[str, Any] = {"InstanceTypes": list(instance_types), "ProductDescriptions": [SPOT_PRODUCT],
                                      "StartTime": now}
            if token:
                kwargs["NextToken"] = token
            with aws_call("EC2", "DescribeSpotPriceHistory", region=self.region):
                page = self.ec2.describe_spot_price_history(**kwargs)
            for item in page.get("SpotPriceHistory", []):
                if not str(item.get("ProductDescription", "")).startswith(SPOT_PRODUCT):
                    continue
                key = (item["InstanceType"], item["AvailabilityZone"])
                stamp = item.get("Timestamp") or now
                if key not in newest or stamp > newest[key][0]:
                    newest[key] = (stamp, float(item["SpotPrice"]))
            token = page.get("NextToken") or ""
            if not token:
                break
        out: Dict[str, Dict[str, float]] = {}
        for (itype, zone), (_, price) in sorted(newest.items()):
            out.setdefault(itype, {})[zone] = price
        return out

    def ondemand(self, instance_type: str) -> Optional[float]:
        """USD per hour for Linux, shared tenancy, in self.region; None when the Pricing API lists no such product."""
        filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in (
            ("instanceType", instance_type), ("regionCode", self.region), ("operatingSystem", "Linux"),
            ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"))]
        what = f"on-demand price of {instance_type} in {self.region}"
        with aws_call("Pricing", "GetProducts", region=PRICING_REGION, subject=what):
            page = self.pricing.get_products(ServiceCode="AmazonEC2", Filters=filters, FormatVersion="aws_v1",
                                             MaxResults=10)
        for raw in page.get("PriceList", []):
            product = json.loads(raw) if isinstance(raw, str) else raw
            for term in product.get("terms", {}).get("OnDemand", {}).values():
                for dim in term.get("priceDimensions", {}).values():
                    usd = dim.get("pricePerUnit", {}).get("USD")
                    if usd is not None and dim.get("unit", "Hrs") in ("Hrs", "Hours") and float(usd) > 0:
                        return float(usd)
        return None

    def table(self, instance_types: Iterable[str]) -> PriceTable:
        types = sorted(set(instance_types))
        spot = self.spot(types)
        out: PriceTable = {}
        for itype in types:
            entry: Dict[str, Any] = {}
            zones = spot.get(itype, {})
            if zones:
                entry["spot"] = round(sum(zones.values()) / len(zones), 6)
                entry["spot_by_zone"] = zones
            od = self.ondemand(itype)
            if od is not None:
                entry["ondemand"] = od
            if not entry:
                log.warning("no prices for %s in %s", itype, self.region)
            out[itype] = entry
        return out


def clients(region: str):
    """boto3 clients for EC2 in `region` and the Pricing API in us-east-1."""
    import boto3

    with aws_call("EC2", "client", region=region):
        ec2 = boto3.client("ec2", region_name=region)
    with aws_call("Pricing", "client", region=PRICING_REGION):
        return ec2, boto3.client("pricing", region_name=PRICING_REGION)


def read_table(path: str) -> Dict[str, Any]:
    """The price table file as written by write_table; {} when there is none yet."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable price table ({e}); run `ckpt prices --update` again") from e
    if not isinstance(data, dict) or not isinstance(data.get("prices", {}), dict):
        raise ConfigError(f"{path}: not a price table; run `ckpt prices --update` again")
    return data


def write_table(path: str, prices: PriceTable, region: str, now: Optional[dt.datetime] = None) -> Dict[str, Any]:
    now = now or dt.datetime.now(dt.timezone.utc)
    data = {"generated": iso_seconds(now), "region": region, "source": "ckpt prices --update",
            "prices": prices}
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)
    return data


def effective_prices(config_prices: Dict[str, Dict[str, float]], path: str) -> Tuple[PriceTable, Dict[str, str]]:
    """The table the report uses and where each entry came from ("config" or the file's path)."""
    table: PriceTable = {k: dict(v) for k, v in (config_prices or {}).items()}
    sources = {k: "config" for k in table}
    for itype, entry in (read_table(path).get("prices") or {}).items():
        if isinstance(entry, dict) and entry:
            table.setdefault(itype, {}).update({k: v for k, v in entry.items() if k in ("spot", "ondemand")})
            sources[itype] = path
    return table, sources
