"""A copy of this package that ordinary users can run, for the local cluster (tests and `make demo`).

Slurm runs jobs as their users, and the node agent drops to the user's identity before it starts the namespace
init, so the interpreter and the package must be readable by everyone. A developer's virtual environment often is
not (pyenv under /root, a checkout in a private home), so `make setup` creates one from the system's Python at
SHARED_VENV, and `refresh()` copies the working tree's package into it, as a cluster's bootstrap installs the agent
into /opt/ckpt-agent/venv.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from ckpt_agent import PACKAGE_DIR
from ckpt_agent.util import proc

SHARED_VENV = os.environ.get("CKPT_SHARED_VENV", "/opt/ckpt-agent-dev/venv")


def site_packages(venv: str = SHARED_VENV) -> Path:
    out = proc.run([os.path.join(venv, "bin", "python"), "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=30).stdout.strip()
    return Path(out)


def refresh(venv: str = SHARED_VENV) -> str:
    """Copy the working tree's package into the shared venv; return its bin directory."""
    bin_dir = os.path.join(venv, "bin")
    if not os.access(os.path.join(bin_dir, "ckpt"), os.X_OK):
        raise FileNotFoundError(f"{venv} has no ckpt command: run `make setup` first")
    dest = site_packages(venv) / "ckpt_agent"
    tmp = dest.with_name("ckpt_agent.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(PACKAGE_DIR, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # compiled by the venv's own interpreter, as pip compiles a wheel it installs: without bytecode every `ckpt`
    # command of a user's job compiles its modules again (PYTHONDONTWRITEBYTECODE, or a directory it cannot write)
    proc.run([os.path.join(bin_dir, "python"), "-m", "compileall", "-q", "-d", str(dest), str(tmp)], timeout=120)
    for root, _dirs, files in os.walk(tmp):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return bin_dir


__all__ = ["SHARED_VENV", "refresh", "site_packages", "sysconfig"]
