"""The one mapping of botocore failures to AwsError (exit 80), for every AWS call the project makes.

    with aws_call("S3", "PutObject", region=region_of(client), subject="s3://bucket/key"):
        client.put_object(...)

Any botocore error in the block (ClientError, NoCredentialsError, EndpointConnectionError, any other
BotoCoreError) leaves it as one AwsError line naming what was asked, of which service, where, and the error code:
    s3://bucket/key: S3 PutObject (eu-west-1): AccessDenied: Access Denied
`hints` adds a remedy for a known error code. botocore is imported only when a call fails or is made, so that
modules using this stay importable on nodes without boto3.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

from ckpt_agent.errors import AwsError

NO_CREDENTIALS_HINT = "configure AWS credentials (an instance role, AWS_PROFILE or ~/.aws/credentials)"


def region_of(client: Any) -> Optional[str]:
    """The region a boto3 client calls, or None for objects that are not one (test doubles)."""
    return getattr(getattr(client, "meta", None), "region_name", None)


def describe(service: str, operation: str, error: Exception, *, region: Optional[str] = None, subject: str = "",
             hints: Optional[Mapping[str, str]] = None) -> str:
    """The one line for a botocore error: [subject: ]service operation[ (region)]: code[: message][; hint]."""
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        err = error.response.get("Error", {}) or {}
        code, message = str(err.get("Code") or "error"), str(err.get("Message") or "")
    else:
        code, message = type(error).__name__, str(error)
    hint = dict({"NoCredentialsError": NO_CREDENTIALS_HINT}, **(hints or {})).get(code, "")
    line = f"{subject}: " if subject else ""
    line += f"{service} {operation}" + (f" ({region})" if region else "") + f": {code}"
    line += (f": {message}" if message and message != code else "") + (f"; {hint}" if hint else "")
    return " ".join(line.split())  # one line, whatever the message holds


@contextmanager
def aws_call(service: str, operation: str, *, region: Optional[str] = None, subject: str = "",
             hints: Optional[Mapping[str, str]] = None) -> Iterator[None]:
    """Run the block; a botocore error in it becomes AwsError (see describe)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as e:
        raise AwsError(describe(service, operation, e, region=region, subject=subject, hints=hints)) from e
