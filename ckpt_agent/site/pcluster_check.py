"""Offline checks of a rendered cluster.yaml with the real `aws-parallelcluster` package (the optional `validate`
extra).

Contract:
- `check_schema(text)`: ParallelCluster's marshmallow ClusterSchema; needs no AWS (only a region name). Returns the
  problems as "Key.Path: message" strings, empty when valid.
- `check_full(text)`: every validator `pcluster create-cluster --dryrun` runs. It calls EC2, IAM and S3, so the caller
  provides them: a real account, or moto in tests. Returns ERROR-level failures as "Validator: message" strings.
Both raise ConfigError when the package is not installed.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List

import yaml

from ckpt_agent.errors import ConfigError

# moto cannot answer the RunInstances dry run these two validators make (ephemeral-disk block device mappings);
# callers validating against moto suppress them.
NOT_INSTALLED = "the aws-parallelcluster package is not installed (pip install 'ckpt-agent[validate]')"
LAUNCH_TEMPLATE_VALIDATORS = ("HeadNodeLaunchTemplateValidator", "ComputeResourceLaunchTemplateValidator")


def _flatten(messages: Any, prefix: str = "") -> List[str]:
    if isinstance(messages, dict):
        out: List[str] = []
        for key, value in messages.items():
            out += _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return [f"{prefix or '(top level)'}: {m}" for m in messages]
    if isinstance(messages, list):
        out = []
        for m in messages:
            out += _flatten(m, prefix)
        return out
    return [f"{prefix or '(top level)'}: {messages}"]


def check_schema(text: str, *, cluster_name: str = "ckpt-check", region: str = "us-east-1") -> List[str]:
    try:
        from marshmallow import ValidationError
        from pcluster.schemas.cluster_schema import ClusterSchema
    except ImportError as e:
        raise ConfigError(NOT_INSTALLED) from e
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    try:
        ClusterSchema(cluster_name=cluster_name).load(yaml.safe_load(text))
    except ValidationError as e:
        return sorted(_flatten(e.messages))
    return []


def check_full(
    text: str, *, cluster_name: str = "ckpt-check", suppress: Iterable[str] = (), min_level: str = "WARNING"
) -> List[str]:
    """Failures at `min_level` (INFO, WARNING, ERROR) or above, as "LEVEL Validator: message" strings."""
    try:
        import pcluster.config.cluster_config  # noqa: F401  (import first: avoids a circular import in validators)
        from pcluster.config.common import TypeMatchValidatorsSuppressor
        from pcluster.models.cluster import Cluster, ConfigValidationError
        from pcluster.validators.common import FailureLevel
    except ImportError as e:
        raise ConfigError(NOT_INSTALLED) from e
    suppressors = {TypeMatchValidatorsSuppressor(set(suppress))} if suppress else set()
    try:
        failures = Cluster(cluster_name, text).validate_create_request(suppressors, FailureLevel.ERROR)
    except ConfigValidationError as e:
        failures = e.validation_failures
        if not failures:
            return [f"ERROR {e}"]
    floor = FailureLevel[min_level].value
    return [f"{f.level.name} {f.validator_type}: {f.message}" for f in failures if f.level.value >= floor]
