"""`aws_prices` and `ckpt prices`: Spot prices from EC2 (moto, and a Stubber for per-zone detail), On-Demand
prices from the Pricing API (botocore Stubber: moto does not implement pricing.get_products), the table file the
report reads, and one-line AWS errors with exit 80."""

from __future__ import annotations

import datetime as dt
import json

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from ckpt_agent import cli
from ckpt_agent.adapters.aws_prices import AwsPrices, effective_prices, read_table, write_table
from ckpt_agent.errors import EXIT_AWS, EXIT_CONFIG, EXIT_USAGE, ConfigError

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 29, 4, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)


def product(itype, usd, unit="Hrs"):
    return json.dumps({"product": {"attributes": {"instanceType": itype}}, "terms": {"OnDemand": {"T1": {
        "priceDimensions": {"D1": {"unit": unit, "pricePerUnit": {"USD": str(usd)}}}}}}})


def stubbed_pricing(answers):
    """A pricing client answering get_products for each (instance type, USD or None) in order."""
    client = boto3.client("pricing", region_name="us-east-1")
    stub = Stubber(client)
    for itype, usd in answers:
        filters = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in (
            ("instanceType", itype), ("regionCode", "eu-west-1"), ("operatingSystem", "Linux"), ("tenancy", "Shared"),
            ("preInstalledSw", "NA"), ("capacitystatus", "Used"))]
        stub.add_response("get_products", {"PriceList": [] if usd is None else [product(itype, usd)],
                                           "FormatVersion": "aws_v1"},
                          {"ServiceCode": "AmazonEC2", "Filters": filters, "FormatVersion": "aws_v1",
                           "MaxResults": 10})
    stub.activate()
    return client, stub


def test_spot_prices_from_moto():
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="eu-west-1")
        spot = AwsPrices(ec2, None, "eu-west-1").spot(["c6i.large", "m6i.large"])
    assert set(spot) == {"c6i.large", "m6i.large"}
    assert set(spot["c6i.large"]) == {"eu-west-1a", "eu-west-1b", "eu-west-1c"}
    assert all(p > 0 for zones in spot.values() for p in zones.values())


def test_spot_takes_newest_per_zone_linux_only_over_pages():
    ec2 = boto3.client("ec2", region_name="eu-west-1")
    stub = Stubber(ec2)

    def item(zone, price, hour, product="Linux/UNIX"):
        return {"AvailabilityZone": zone, "InstanceType": "c6i.large", "ProductDescription": product,
                "SpotPrice": str(price), "Timestamp": dt.datetime(2026, 11, 29, hour, tzinfo=UTC)}

    stub.add_response("describe_spot_price_history", {"SpotPriceHistory": [
        item("eu-west-1a", 0.05, 1), item("eu-west-1a", 0.03, 3), item("eu-west-1b", 0.9, 3, "Windows")],
        "NextToken": "p2"}, {"InstanceTypes": ["c6i.large"], "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY})
    stub.add_response("describe_spot_price_history", {"SpotPriceHistory": [item("eu-west-1b", 0.04, 2)],
                                                      "NextToken": ""},
                      {"InstanceTypes": ["c6i.large"], "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY,
                       "NextToken": "p2"})
    with stub:
        spot = AwsPrices(ec2, None, "eu-west-1").spot(["c6i.large"], now=NOW)
    assert spot == {"c6i.large": {"eu-west-1a": 0.03, "eu-west-1b": 0.04}}


def test_table_combines_spot_and_ondemand():
    pricing, stub = stubbed_pricing([("c6i.large", 0.0856), ("x9.huge", None)])
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="eu-west-1")
        with stub:
            table = AwsPrices(ec2, pricing, "eu-west-1").table(["x9.huge", "c6i.large"])
        stub.assert_no_pending_responses()
    assert table["c6i.large"]["ondemand"] == 0.0856
    assert table["c6i.large"]["spot"] == pytest.approx(0.00001)  # moto's fixed Spot price
    assert "ondemand" not in table["x9.huge"]


def test_table_file_round_trip_and_file_wins_over_config(tmp_path):
    path = str(tmp_path / "var" / "prices.json")
    assert read_table(path) == {}
    write_table(path, {"c6i.large": {"spot": 0.031, "ondemand": 0.085, "spot_by_zone": {"a": 0.031}}}, "eu-west-1",
                now=NOW)
    data = read_table(path)
    assert (data["generated"], data["region"]) == ("2026-11-29T04:00:00Z", "eu-west-1")
    table, sources = effective_prices({"c6i.large": {"spot": 0.5, "ondemand": 1.0}, "m6i.large": {"spot": 0.04}},
                                      path)
    assert table == {"c6i.large": {"spot": 0.031, "ondemand": 0.085}, "m6i.large": {"spot": 0.04}}
    assert sources == {"c6i.large": path, "m6i.large": "config"}


def test_damaged_table_file_is_a_config_error(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable price table"):
        read_table(str(path))


# --- CLI ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def cfg(tmp_path, monkeypatch):
    path = tmp_path / "agent.yaml"
    path.write_text(f"prices_file: {tmp_path / 'prices.json'}\nprices:\n  c6i.large: {{spot: 0.03, ondemand: 0.085}}\n")
    monkeypatch.setenv("CKPT_CONFIG", str(path))
    return tmp_path


def test_cli_shows_the_config_table_without_update(cfg, capsys):
    assert cli.main(["prices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("INSTANCE TYPE") and out[1].split() == ["c6i.large", "0.0300", "0.0850", "65%", "config"]


def test_cli_update_writes_the_table_the_report_reads(cfg, monkeypatch, capsys):
    pricing, stub = stubbed_pricing([("c6i.large", 0.0856), ("m6i.large", 0.107)])
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="eu-west-1")
        monkeypatch.setattr("ckpt_agent.commands.prices.clients", lambda region: (ec2, pricing))
        assert cli.main(["prices", "--update", "--region", "eu-west-1", "--instance-types", "c6i.large",
                         "m6i.large"]) == 0
    out = capsys.readouterr().out
    assert f"wrote prices of 2 instance type(s) in eu-west-1 to {cfg / 'prices.json'}" in out
    data = json.loads((cfg / "prices.json").read_text())
    assert data["prices"]["m6i.large"]["ondemand"] == 0.107
    assert cli.main(["prices", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["prices"]["c6i.large"] == {"spot": pytest.approx(0.00001), "ondemand": 0.0856}


def test_cli_update_defaults_to_the_types_in_the_table(cfg, monkeypatch, capsys):
    pricing, stub = stubbed_pricing([("c6i.large", 0.0856)])
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="eu-west-1")
        monkeypatch.setattr("ckpt_agent.commands.prices.clients", lambda region: (ec2, pricing))
        monkeypatch.setenv("AWS_REGION", "eu-west-1")
        assert cli.main(["prices", "--update"]) == 0
    stub.assert_no_pending_responses()


def test_cli_aws_error_is_one_line_exit_80(cfg, monkeypatch, capsys):
    pricing = boto3.client("pricing", region_name="us-east-1")
    stub = Stubber(pricing)
    stub.add_client_error("get_products", "AccessDeniedException", "User is not authorized to perform "
                          "pricing:GetProducts")
    stub.activate()
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="eu-west-1")
        monkeypatch.setattr("ckpt_agent.commands.prices.clients", lambda region: (ec2, pricing))
        assert cli.main(["prices", "--update", "--region", "eu-west-1"]) == EXIT_AWS
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ckpt: on-demand price of c6i.large in eu-west-1: Pricing GetProducts (us-east-1): "
                   "AccessDeniedException: User is not authorized to perform pricing:GetProducts"]
    assert not (cfg / "prices.json").exists()


def test_cli_no_credentials_is_one_line_exit_80(cfg, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert cli.main(["prices", "--update", "--region", "eu-west-1"]) == EXIT_AWS
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckpt: EC2 DescribeSpotPriceHistory (eu-west-1): ")


@pytest.mark.parametrize("argv,code,message", [
    (["prices", "--update", "--instance-types", "c6i.large"], EXIT_USAGE, "ckpt: no region to price"),
], ids=["no-region"])
def test_cli_usage_errors(cfg, capsys, argv, code, message):
    assert cli.main(argv) == code
    assert capsys.readouterr().err.strip().startswith(message)


def test_cli_damaged_table_exit_78(cfg, capsys):
    (cfg / "prices.json").write_text("[]")
    assert cli.main(["prices"]) == EXIT_CONFIG
    assert "not a price table" in capsys.readouterr().err
