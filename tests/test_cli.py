"""The `ckpt` command line through `python -m ckpt_agent`: user errors are one line with their documented exit
code and never a traceback."""

from __future__ import annotations

import pytest
from ckpt_helpers import ckpt_env, run_ckpt

from ckpt_agent import __version__


@pytest.fixture
def env(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    return ckpt_env(store, tmp_path / "run")


def no_store(env):
    env = dict(env)
    env.pop("CKPT_STORE")
    return env


def one_line(res) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ckpt: "), lines[0]
    return lines[0]


def test_run_without_job_id(env, tmp_path):
    res = run_ckpt("run", "--", "true", env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert one_line(res).startswith("ckpt: no job id")
    assert "$SLURM_JOB_ID" in res.stderr


@pytest.mark.parametrize("args", [["list"], ["verify", "--job-id", "7"], ["run", "--job-id", "7", "--", "true"]],
                         ids=["list", "verify", "run"])
def test_no_store_configured(env, tmp_path, args):
    res = run_ckpt(*args, env=no_store(env), cwd=tmp_path)
    assert res.returncode == 78
    assert "no checkpoint store configured" in one_line(res)


def test_explicit_missing_config_file(env, tmp_path):
    res = run_ckpt("list", "--config", str(tmp_path / "nope.yaml"), env=env, cwd=tmp_path)
    assert res.returncode == 78
    assert one_line(res) == f"ckpt: {tmp_path / 'nope.yaml'}: configuration file not found"


@pytest.mark.parametrize("args", [["run", "--job-id", "7"], ["run", "--job-id", "7", "--"]], ids=["none", "dashes"])
def test_run_without_command(env, tmp_path, args):
    res = run_ckpt(*args, env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert "nothing to run" in one_line(res)


def test_verify_unknown_job(env, tmp_path):
    res = run_ckpt("verify", "--job-id", "31337", env=env, cwd=tmp_path)
    assert res.returncode == 66
    assert "no checkpoint of job 31337 step main" in one_line(res)


def test_list_unknown_job(env, tmp_path):
    res = run_ckpt("list", "--job-id", "31337", env=env, cwd=tmp_path)
    assert res.returncode == 66
    one_line(res)


def test_checkpoint_of_a_job_not_running_here(env, tmp_path):
    res = run_ckpt("checkpoint", "--job-id", "31337", env=env, cwd=tmp_path)
    assert res.returncode == 66
    assert "job 31337 step main is not running under ckpt run on this machine" in one_line(res)


def test_job_id_from_slurm_array_environment(env, tmp_path):
    res = run_ckpt("checkpoint", env=dict(env, SLURM_JOB_ID="99", SLURM_ARRAY_JOB_ID="98", SLURM_ARRAY_TASK_ID="3"),
                   cwd=tmp_path)
    assert res.returncode == 66
    assert "job 98_3 step main" in one_line(res)


def test_job_id_that_could_escape_the_store_is_refused(env, tmp_path):
    res = run_ckpt("verify", "--job-id", "../etc", env=env, cwd=tmp_path)
    assert res.returncode not in (0, 70)
    assert "invalid job id" in one_line(res)


def test_empty_store_lists_nothing(env, tmp_path):
    res = run_ckpt("list", "--json", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_version(env, tmp_path):
    res = run_ckpt("--version", env=env, cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout.strip() == f"ckpt {__version__}"
    assert res.stderr == ""


def test_no_subcommand_is_a_usage_error(env, tmp_path):
    res = run_ckpt(env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert "COMMAND" in one_line(res) and "ckpt --help" in one_line(res)


def test_help_listing_matches_every_subcommand_module():
    """`ckpt --help` lists subcommands from cli.COMMANDS without importing them: the texts must stay in step."""
    import importlib

    from ckpt_agent import cli

    for name, text in cli.COMMANDS.items():
        module = importlib.import_module(f"ckpt_agent.commands.{name}")
        assert module.HELP == text, name
