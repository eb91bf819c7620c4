"""errors.py against the README's "Exit codes" table, and the code against errors.py: every documented code has one
owning error class and every class's code a row; no expected failure is raised as the bare CkptError (exit 70 is
for bugs); a code reported through a control socket comes back as the class that owns it."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from ckpt_agent import errors

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("ckpt_agent", "ckpt_dev")
# Rows of the table that are statuses, not errors: the tool's own exit status, passed through by `ckpt run`, and a
# final checkpoint's stop (EXIT_FINAL).
STATUS_ROWS = {"0-255", str(errors.EXIT_FINAL)}
# Classes that keep the base's 70 on purpose: a subprocess failure the adapter that ran it did not turn into an error
# of its kind is a bug.
BUG_CARRIERS = {errors.CkptError, errors.CommandError}


def readme_exit_codes(text: str) -> List[str]:
    """The first column of the table under "### Exit codes", header and separator skipped."""
    lines = text.splitlines()
    start = lines.index("### Exit codes")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append(line.strip("|").split("|")[0].strip())
    assert rows[:2] == ["code", "---"], "the table starts with its header and separator"
    assert rows[2:], "the Exit codes table has rows"
    return rows[2:]


def error_classes() -> List[type]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.CkptError) and c.__module__ == errors.__name__]


def all_error_classes() -> List[type]:
    """Every CkptError subclass defined anywhere in the scanned packages (each module imported; no entry point run)."""
    for root in SCANNED:
        pkg = importlib.import_module(root)
        for m in pkgutil.walk_packages(pkg.__path__, f"{root}."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
    out, todo = [], [errors.CkptError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return [c for c in out if c.__module__.split(".")[0] in SCANNED]


def owners() -> Dict[int, List[type]]:
    """Each code and the classes that set it in their own body (the base CkptError owns 70)."""
    out: Dict[int, List[type]] = {}
    for c in error_classes():
        if "exit_code" in vars(c):
            out.setdefault(c.exit_code, []).append(c)
    return out


def bare_raises(root: Path) -> List[Tuple[str, int]]:
    """file:line of every `raise CkptError(...)` (or `raise CkptError`, `raise errors.CkptError(...)`) under root."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else ""
            if name == "CkptError":
                found.append((str(path.relative_to(root.parent)), node.lineno))
    return found


# --- (a) the README's table and errors.py agree --------------------------------------------------------------------
def test_every_documented_code_has_exactly_one_owning_class():
    rows = readme_exit_codes((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(rows) == len(set(rows)), f"a code has two rows: {rows}"
    owned = owners()
    for row in rows:
        if row in STATUS_ROWS:
            continue
        assert re.fullmatch(r"\d+", row), f"README Exit codes: row {row!r} is not a code"
        classes = owned.get(int(row), [])
        assert len(classes) == 1, f"README Exit codes: code {row} is owned by {[c.__name__ for c in classes]} " \
                                  "in errors.py (exactly one class must set it)"


def test_every_error_class_and_exit_constant_has_a_row():
    rows = set(readme_exit_codes((REPO / "README.md").read_text(encoding="utf-8")))
    for c in error_classes():
        assert str(c.exit_code) in rows, f"errors.{c.__name__}: exit {c.exit_code} has no row in the README's " \
                                         "Exit codes table"
    for name, value in vars(errors).items():
        if name.startswith("EXIT_"):
            assert str(value) in rows, f"errors.{name} = {value} has no row in the README's Exit codes table"


def test_error_classes_outside_errors_py_use_documented_codes_and_70_is_only_for_bugs():
    rows = set(readme_exit_codes((REPO / "README.md").read_text(encoding="utf-8")))
    classes = all_error_classes()
    assert errors.LaunchError in classes and len(classes) > len(error_classes()), "the walk sees every module"
    for c in classes:
        assert str(c.exit_code) in rows, f"{c.__module__}.{c.__name__}: exit {c.exit_code} has no row in the " \
                                         "README's Exit codes table"
    internal = [f"{c.__module__}.{c.__name__}" for c in classes
                if c.exit_code == errors.EXIT_INTERNAL and c not in BUG_CARRIERS]
    assert not internal, f"expected failures need their own code, not 70: {internal}"


def test_the_table_parser_sees_drift():
    table = "### Exit codes\n\n| code | meaning |\n|---|---|\n| 0-255 | status |\n| 66 | x |\n| 66 | y |\n\n## Next\n"
    assert readme_exit_codes(table) == ["0-255", "66", "66"]


# --- (b) no expected failure is raised as the bare base class ------------------------------------------------------
def test_no_bare_ckpt_error_is_raised():
    found = [hit for root in SCANNED for hit in bare_raises(REPO / root)]
    assert not found, "raise a CkptError subclass with its own exit code instead (exit 70 is for bugs): " + \
        ", ".join(f"{f}:{n}" for f, n in found)


def test_the_walk_finds_bare_raises(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("from ckpt_agent import errors\nfrom ckpt_agent.errors import CkptError, StoreError\n"
                              "def f(x):\n    if x:\n        raise CkptError('x')\n    if x > 1:\n"
                              "        raise errors.CkptError\n    raise StoreError('fine')\n")
    assert bare_raises(pkg) == [("pkg/m.py", 5), ("pkg/m.py", 7)]


# --- (c) codes reported over a socket come back as their class ----------------------------------------------------
@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_error_for_exit_code_round_trips(cls):
    err = errors.error_for_exit_code(cls.exit_code, "it failed")
    assert err.exit_code == cls.exit_code and str(err) == "it failed"
    assert isinstance(err, errors.CkptError)
    if "exit_code" in vars(cls):
        assert type(err) is cls, f"exit {cls.exit_code} comes back as {type(err).__name__}, not {cls.__name__}"


def test_an_unknown_code_is_a_bug():
    err = errors.error_for_exit_code(12, "odd")
    assert type(err) is errors.CkptError and err.exit_code == errors.EXIT_INTERNAL
