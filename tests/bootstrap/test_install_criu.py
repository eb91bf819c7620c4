"""bootstrap/install-criu.sh's lookup of the Debian mirror, the one place the project derives it from apt sources.

The build itself is tested by the CRIU work (`make setup` runs it; tests/adapters/test_criu.py checks the result).
"""

from __future__ import annotations

import subprocess

import pytest
from ckpt_helpers import REPO

SCRIPT = REPO / "bootstrap" / "install-criu.sh"

DEB822 = """Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
"""


def print_mirror(etc):
    return subprocess.run(["bash", str(SCRIPT), "--print-mirror"], env={"PATH": "/usr/bin:/bin",
                          "CRIU_APT_ETC": str(etc)}, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("files, want", [
    ({"sources.list.d/debian.sources": DEB822}, "http://mirror.example.org/debian"),
    ({"sources.list": "deb http://security.example.org/debian-security bookworm-security main\n"
                      "# deb http://commented.example.org/debian bookworm main\n"
                      "deb http://line.example.org/debian bookworm main\n"}, "http://line.example.org/debian"),
    ({"sources.list.d/other.list": "deb http://ppa.example.org/ubuntu jammy main\n",
      "sources.list.d/mirror.list": "deb [arch=amd64 signed-by=/k.gpg] http://list.example.org/debian/ trixie main\n"},
     "http://list.example.org/debian"),
], ids=["deb822", "one-line", "list-files-with-options"])
def test_the_mirror_comes_from_the_apt_sources(tmp_path, files, want):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    proc = print_mirror(tmp_path)
    assert (proc.returncode, proc.stdout) == (0, want + "\n"), proc.stderr


def test_no_debian_mirror_is_one_clear_line(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "x.list").write_text("deb http://ppa.example.org/ubuntu jammy main\n")
    proc = print_mirror(tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"no Debian mirror in the apt sources under {tmp_path}" in proc.stderr
