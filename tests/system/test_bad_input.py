"""Bad input, table-driven over every subcommand (issue 11): one line `ckpt: <what and where>` (or, for a site file's
problems, one `FILE:LINE: key: message` line), a documented exit code, never 70, a traceback or a hang.

Config files are given with --config (agent.yaml) or as the SITE.yaml argument; flags are checked up front."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from ckpt_helpers import DATA, ckpt_cmd, ckpt_env

from ckpt_agent.cli import COMMANDS
from ckpt_agent.errors import EXIT_CONFIG, EXIT_USAGE

TIMEOUT = 60  # a safety net: before the fix a FIFO config hung for ever

BILLION_LAUGHS = "\n".join(
    ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
) + "\n"
NESTED = "store: " + "[" * 20000 + "]" * 20000 + "\n"
MINIMAL_SITE = (DATA / "site" / "minimal.yaml").read_text()


def _site_with(queue_checkpoint: str) -> str:
    return MINIMAL_SITE + f"    checkpoint: {queue_checkpoint}\n"


# id: (agent.yaml content, site file content, expected words); None content: made by `special` below
CONFIG_CASES = {
    "binary": (b"\x00\x01\x02\xff\xfe\xfd" * 100, None, "UTF-8"),
    "utf-16": ("store: /x\n".encode("utf-16"), None, "UTF-16"),
    "control-characters": (b"store: a\x07b\n", None, "special characters"),
    "20000-nested-brackets": (NESTED.encode(), None, "nested more than"),
    "inf-number": (b"monitoring:\n  timeout: .inf\n", _site_with("{keep: 2, poll_interval: .inf}").encode(),
                   "finite"),
    "nan-poll-interval": (b"agent:\n  poll_interval: .nan\n", _site_with("{poll_interval: .nan}").encode(),
                          "finite"),
    "huge-number": (b"monitoring:\n  timeout: 1.0e+300\n", _site_with("{poll_interval: 1.0e+300}").encode(),
                    "must be <="),
    "alias-bomb": (BILLION_LAUGHS.encode(), None, "alias"),
    "50MB-file": (None, None, "larger than"),
    "fifo": (None, None, "not a regular file"),
}

# every subcommand that reads agent.yaml, with arguments that get it as far as reading it
AGENT_CONFIG_COMMANDS = {
    "run": ["run", "--job-id", "7", "--", "true"],
    "checkpoint": ["checkpoint", "--job-id", "7"],
    "list": ["list"],
    "verify": ["verify", "--job-id", "7"],
    "agent": ["agent"],
    "gc": ["gc"],
    "report": ["report", "--no-slurm"],
    "prices": ["prices"],
}
SITE_COMMANDS = {"validate": ["validate"], "render": ["render"], "upload": ["upload"], "plan": ["plan"]}


def test_the_tables_cover_every_subcommand():
    assert set(AGENT_CONFIG_COMMANDS) | set(SITE_COMMANDS) == set(COMMANDS)


@pytest.fixture
def env(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    return ckpt_env(store, tmp_path / "run")


def run(argv, env, cwd):
    try:
        return subprocess.run(ckpt_cmd(*argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ckpt {' '.join(argv)} hung (more than {TIMEOUT} s)")


def one_line(res, stream: str = "stderr") -> str:
    text = getattr(res, stream)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = text.strip().splitlines()
    assert len(lines) == 1, (res.returncode, res.stdout, res.stderr)
    return lines[0]


def make_config(path: Path, case: str, site: bool) -> None:
    agent_text, site_text, _ = CONFIG_CASES[case]
    if case == "50MB-file":
        with open(path, "wb") as fh:
            fh.write(b"store: /x\n")
            fh.truncate(50 << 20)
    elif case == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(site_text if site and site_text is not None else agent_text)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.parametrize("command", list(AGENT_CONFIG_COMMANDS) + list(SITE_COMMANDS))
def test_bad_config_file(env, tmp_path, command, case):
    site = command in SITE_COMMANDS
    path = tmp_path / "bad.yaml"
    make_config(path, case, site)
    words = CONFIG_CASES[case][2]
    if site:
        res = run(SITE_COMMANDS[command] + [str(path)], env, tmp_path)
    else:
        res = run(AGENT_CONFIG_COMMANDS[command][:1] + ["--config", str(path)] + AGENT_CONFIG_COMMANDS[command][1:],
                  env, tmp_path)
    if site and CONFIG_CASES[case][1] is not None:
        # a value the schema refuses: the site file's problem list, exit 2
        assert res.returncode == EXIT_USAGE, (res.stdout, res.stderr)
        line = one_line(res, "stdout" if command == "validate" else "stderr")
        assert line.startswith(f"{path}:") and words in line
        return
    if command == "validate":  # every problem of a site file is a problem `ckpt validate` lists: exit 2
        assert res.returncode == EXIT_USAGE, (res.returncode, res.stdout, res.stderr)
        line = one_line(res, "stdout")
        assert line.startswith(f"{path}") and words in line, line
        return
    assert res.returncode == EXIT_CONFIG, (res.returncode, res.stdout, res.stderr)
    line = one_line(res)
    assert line.startswith(f"ckpt: {path}") and words in line, line


FLAG_CASES = {
    # id: (argv, expected words)
    "run-interval-nan": (["run", "--job-id", "7", "--interval", "nan", "--", "true"], "--interval"),
    "run-interval-inf": (["run", "--job-id", "7", "--interval", "inf", "--", "true"], "--interval"),
    "run-interval-1e300": (["run", "--job-id", "7", "--interval", "1e300", "--", "true"], "--interval"),
    "run-interval-negative": (["run", "--job-id", "7", "--interval", "-5", "--", "true"], "--interval"),
    "checkpoint-timeout-nan": (["checkpoint", "--job-id", "7", "--timeout", "nan"], "--timeout"),
    "checkpoint-timeout-inf": (["checkpoint", "--job-id", "7", "--timeout", "inf"], "--timeout"),
    "checkpoint-timeout-1e300": (["checkpoint", "--job-id", "7", "--timeout", "1e300"], "--timeout"),
    "agent-poll-interval-nan": (["agent", "--poll-interval", "nan"], "--poll-interval"),
    "checkpoint-name-path": (["checkpoint", "--job-id", "7", "--name", "/../../../../x/evil"], "--name"),
    "checkpoint-name-too-long": (["checkpoint", "--job-id", "7", "--name", "n" * 300], "--name"),
    "run-name-path": (["run", "--job-id", "7", "--name", "../x", "--", "true"], "--name"),
    "verify-name-path": (["verify", "--job-id", "7", "--name", "a/b"], "--name"),
    "list-empty-job-id": (["list", "--job-id", ""], "--job-id"),
    "report-empty-job-id": (["report", "--no-slurm", "--job-id", ""], "--job-id"),
    "verify-empty-job-id": (["verify", "--job-id", ""], "--job-id"),
    "checkpoint-empty-job-id": (["checkpoint", "--job-id", ""], "--job-id"),
    "run-empty-job-id": (["run", "--job-id", "", "--", "true"], "--job-id"),
    "list-job-id-path": (["list", "--job-id", "../etc"], "--job-id"),
    "report-job-id-path": (["report", "--no-slurm", "--job-id", "../etc"], "--job-id"),
    "verify-job-id-too-long": (["verify", "--job-id", "9" * 200], "--job-id"),
    "gc-grace-nan": (["gc", "--grace", "nan"], "--grace"),
    "report-since-nonsense": (["report", "--no-slurm", "--since", "the day before"], "--since"),
    "validate-no-file": (["validate"], "SITE.yaml"),
    "render-no-file": (["render"], "SITE.yaml"),
    "upload-no-file": (["upload"], "SITE.yaml"),
    "prices-unknown-flag": (["prices", "--colour"], "--colour"),
    "unknown-subcommand": (["frobnicate"], "frobnicate"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_flag_is_refused_up_front_with_exit_2(env, tmp_path, case):
    argv, words = FLAG_CASES[case]
    res = run(argv, env, tmp_path)
    assert res.returncode == EXIT_USAGE, (res.returncode, res.stdout, res.stderr)
    line = one_line(res)
    assert line.startswith("ckpt: ") and words in line, line


def test_a_checkpoint_name_never_reaches_a_file_outside_the_runtime_dir(env, tmp_path):
    """The probe planted a registration outside the runtime directory and reached it with --name /../../..."""
    evil = tmp_path / "x"
    evil.mkdir()
    (evil / "evil.json").write_text('{"socket": "/nonexistent.sock", "pid": 1}')
    rel = os.path.relpath(evil / "evil", Path(env["CKPT_RUNTIME_DIR"]) / "jobs")
    res = run(["checkpoint", "--job-id", "7", "--name", rel], env, tmp_path)
    assert res.returncode == EXIT_USAGE and "--name" in one_line(res)


@pytest.mark.parametrize("timeout", ["nan", float("inf"), 1e300, -1, "soon", True])
def test_the_agent_refuses_a_timeout_that_is_not_finite_seconds(timeout):
    """A raw request to the agent's socket gets the same check as `ckpt checkpoint --timeout`, before any dump."""
    from ckpt_agent.errors import UsageError
    from ckpt_agent.node.privileged import PrivilegedService

    service = PrivilegedService(engine=None, owner_of=lambda job: 0)
    with pytest.raises(UsageError, match="timeout"):
        service.handle({"op": "checkpoint", "job_id": "7", "step": "main", "timeout": timeout, "init_pid": 1},
                       (1, 0, 0), [])
