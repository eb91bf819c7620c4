"""`adapters/aws.py`: every botocore failure in an `aws_call` block becomes one AwsError line (exit 80) naming the
service, the operation, the region and the error code; anything else passes through untouched."""

from __future__ import annotations

import socket

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from botocore.stub import Stubber

from ckpt_agent.adapters.aws import NO_CREDENTIALS_HINT, aws_call, region_of
from ckpt_agent.errors import EXIT_AWS, AwsError

TOPIC = "arn:aws:sns:eu-west-1:123456789012:ckpt"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def sns(**kw):
    return boto3.client("sns", region_name="eu-west-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", **kw)


def test_client_error_names_service_operation_region_and_code():
    client = sns()
    with Stubber(client) as stub:
        stub.add_client_error("publish", "AuthorizationError", "User is not authorized to perform SNS:Publish")
        with pytest.raises(AwsError) as e, aws_call("SNS", "Publish", region=region_of(client), subject=TOPIC):
            client.publish(TopicArn=TOPIC, Message="m")
    assert e.value.exit_code == EXIT_AWS
    assert str(e.value) == (f"{TOPIC}: SNS Publish (eu-west-1): AuthorizationError: User is not authorized to "
                            "perform SNS:Publish")
    assert isinstance(e.value.__cause__, ClientError)


def test_a_hint_for_a_known_code_is_added():
    client = sns()
    with Stubber(client) as stub:
        stub.add_client_error("publish", "NotFound", "Topic does not exist")
        with pytest.raises(AwsError) as e, aws_call("SNS", "Publish", region="eu-west-1",
                                                    hints={"NotFound": "create the topic first"}):
            client.publish(TopicArn=TOPIC, Message="m")
    assert str(e.value) == "SNS Publish (eu-west-1): NotFound: Topic does not exist; create the topic first"


def test_missing_credentials_are_one_line_with_a_remedy():
    client = boto3.client("sns", region_name="eu-west-1")
    with pytest.raises(AwsError) as e, aws_call("SNS", "Publish", region=region_of(client)):
        client.publish(TopicArn=TOPIC, Message="m")
    assert isinstance(e.value.__cause__, NoCredentialsError)
    assert str(e.value) == f"SNS Publish (eu-west-1): NoCredentialsError: Unable to locate credentials; " \
                           f"{NO_CREDENTIALS_HINT}"


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a loopback port nothing listens on once closed: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = sns(endpoint_url=f"http://127.0.0.1:{port}",
                 config=Config(retries={"max_attempts": 0}, connect_timeout=2, read_timeout=2))
    with pytest.raises(AwsError) as e, aws_call("SNS", "Publish", region=region_of(client), subject=TOPIC):
        client.publish(TopicArn=TOPIC, Message="m")
    assert isinstance(e.value.__cause__, EndpointConnectionError)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(f"{TOPIC}: SNS Publish (eu-west-1): EndpointConnectionError: Could not connect to the "
                           f"endpoint URL: \"http://127.0.0.1:{port}/\""), line


def test_a_multi_line_message_is_folded_into_one_line():
    err = ClientError({"Error": {"Code": "Throttling", "Message": "slow down\n  and retry"}}, "PutMetricData")
    with pytest.raises(AwsError) as e, aws_call("CloudWatch", "PutMetricData"):
        raise err
    assert str(e.value) == "CloudWatch PutMetricData: Throttling: slow down and retry"


def test_other_exceptions_pass_through_untouched():
    with pytest.raises(ValueError, match="not an AWS problem"), aws_call("SNS", "Publish"):
        raise ValueError("not an AWS problem")


def test_region_of():
    assert region_of(sns()) == "eu-west-1"
    assert region_of(object()) is None
