"""Every lifecycle event name in the code is a constant of store/event_names.py: no emitter or reader spells one."""

import ast
import pathlib

import pytest

from ckpt_agent.store import event_names as ev

ROOT = pathlib.Path(__file__).resolve().parents[2]
CODE = sorted(p for d in ("ckpt_agent", "ckpt_dev") for p in (ROOT / d).rglob("*.py")
              if p.name != "event_names.py")
EMITTERS = {"emit", "_emit"}


def _is_event_lookup(node: ast.AST, names=frozenset()) -> bool:
    """`x.get("event")`, `x["event"]`, or a variable assigned from one (readers call it `kind`)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "event"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "event"
    return isinstance(node, ast.Name) and node.id in names


def _literals(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for elt in node.elts:
            yield from _literals(elt)


def spelled_event_names(tree: ast.AST):
    """(line, literal) of each string literal used as an event name: the event argument of emit()/_emit(), the
    value of an "event" key in a dict literal, a comparison with a record's event."""
    names = frozenset(t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and _is_event_lookup(node.value)
                      for t in node.targets if isinstance(t, ast.Name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in EMITTERS:
                args = list(node.args)
                # events.emit(store, job_id, event, ...); NoticeHandler._emit and Requeuer.emit(job_id, event, ...);
                # Runner._emit(event, ...)
                if args:
                    event = args[2] if len(args) >= 3 else args[-1]
                    yield from ((event.lineno, c.value) for c in _literals(event))
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "event":
                    yield from ((v.lineno, c.value) for c in _literals(v))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_event_lookup(s, names) for s in sides):
                yield from ((s.lineno, c.value) for s in sides for c in _literals(s) if not _is_event_lookup(s, names))


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_event_name_is_spelled_outside_event_names(path):
    found = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
             for line, value in spelled_event_names(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "use the constants of ckpt_agent/store/event_names.py: " + ", ".join(found)


def test_the_check_finds_a_spelled_name():
    code = ('emit(store, "1", "checkpoint_committed")\nself._emit("1", "made_up")\n'
            'kind = r.get("event")\nif kind == "drained": pass\n'
            'if r.get("event") in ("requeued", ev.DRAINED): pass\nx = {"event": "gc_removed"}\n')
    assert sorted(v for _, v in spelled_event_names(ast.parse(code))) == [
        "checkpoint_committed", "drained", "gc_removed", "made_up", "requeued"]


def test_constants_are_snake_case_and_distinct():
    names = [v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str)]
    assert len(names) == len(set(names)) == len(ev.ALL_EVENTS)
    assert all(n.replace("_", "").isalpha() and n.islower() for n in names)
    assert set(ev.JOB_EVENTS) <= ev.ALL_EVENTS
