"""The package copy ordinary users' jobs run (ckpt_dev/shared_venv.py) is installed as a node's wheel install is:
compiled, so a `ckpt` command does not compile its modules again at every start."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from ckpt_dev import shared_venv

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the shared venv is root's (make setup)")


def test_refresh_leaves_bytecode_every_user_can_read_and_the_commands_use_it():
    bin_dir = shared_venv.refresh()
    python = os.path.join(bin_dir, "python")
    dest = shared_venv.site_packages() / "ckpt_agent"
    # every command module, as `ckpt` loads one (but those of the admin's extras: jinja2 is not on nodes); -v says
    # where each code object came from
    modules = sorted(p.stem for p in (dest / "commands").glob("*.py") if p.stem != "__init__")
    script = ("import importlib, ckpt_agent.cli as cli\n"
              f"for m in {modules!r}:\n"
              "    try:\n"
              "        importlib.import_module('ckpt_agent.commands.' + m)\n"
              "    except ModuleNotFoundError as e:\n"
              "        assert not e.name.startswith('ckpt_agent'), e\n"
              "print(cli.main.__code__.co_filename)\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    res = subprocess.run([python, "-v", "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd="/")  # not the checkout: -c puts the working directory first on sys.path
    assert res.returncode == 0, res.stderr[-2000:]
    from_source = [line for line in res.stderr.splitlines()
                   if line.startswith("# code object from ") and str(dest) in line and line.rstrip().endswith(".py")]
    assert not from_source, from_source[:5]
    from_bytecode = [line for line in res.stderr.splitlines()
                     if line.startswith("# code object from '") and str(dest) in line]
    assert len(from_bytecode) > len(modules)
    # tracebacks name the installed file, not the directory it was compiled in before it was moved into place
    assert res.stdout.strip() == str(dest / "cli.py")
    for pyc in dest.rglob("*.pyc"):
        assert stat.S_IMODE(pyc.stat().st_mode) & 0o004, pyc
        assert stat.S_IMODE(pyc.parent.stat().st_mode) & 0o005 == 0o005, pyc.parent
