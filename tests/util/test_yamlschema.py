"""The generic line-tracking schema engine."""

from __future__ import annotations

import pytest

from ckpt_agent.errors import ConfigError
from ckpt_agent.util.yamlschema import (
    AnyMap,
    Bool,
    Duration,
    Field,
    Float,
    Int,
    List,
    Map,
    Scalar,
    Str,
    format_path,
    load_yaml_with_lines,
    validate,
)

SCHEMA = Map(
    {
        "name": Field(Str(pattern=r"[a-z]+", pattern_help="lowercase letters"), required=True),
        "size": Field(Int(min=1, max=10), default=3),
        "ratio": Field(Float(min=0, max=1), default=0.5),
        "on": Field(Bool(), default=False),
        "every": Field(Duration(min=60), default=900),
        "kind": Field(Str(choices=("alpha", "beta")), default="alpha"),
        "items": Field(List(Map({"id": Field(Int(), required=True)}), min_items=1), default=list),
        "labels": Field(AnyMap(Str(max_len=5), Scalar()), default=dict),
        "opt": Field(Map({"x": Field(Int(), default=1)}), fill=False),
        "sub": Field(Map({"x": Field(Int(), default=1)})),
    }
)


def check(text):
    data, lines = load_yaml_with_lines(text, "f.yaml")
    return validate(data, SCHEMA, "f.yaml", lines)


def messages(text):
    return [str(p) for p in check(text)[1]]


def test_defaults_are_filled_and_durations_converted():
    out, problems = check("name: abc\nevery: 1h\n")
    assert problems == []
    assert out == {
        "name": "abc", "size": 3, "ratio": 0.5, "on": False, "every": 3600, "kind": "alpha", "items": [],
        "labels": {}, "opt": None, "sub": {"x": 1},
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: abc\nsize: 11\n", "f.yaml:2: size: must be <= 10, got 11"),
        ("name: abc\nsize: true\n", "f.yaml:2: size: must be a whole number, got a boolean (true)"),
        ("name: abc\nratio: '0.3'\n", "f.yaml:2: ratio: must be a number, got a string ('0.3')"),
        ("name: ABC\n", "f.yaml:1: name: must be lowercase letters, got 'ABC'"),
        ("name: abc\nkind: alfa\n", "f.yaml:2: kind: must be one of alpha, beta, got 'alfa' (did you mean 'alpha'?)"),
        ("name: abc\nsiz: 2\n", "f.yaml:2: siz: unknown key (did you mean 'size'?)"),
        ("name: abc\nevery: 30s\n", "f.yaml:2: every: must be >= 60 s, got 30"),
        ("name: abc\nevery: soon\n", "f.yaml:2: every: must be a duration (seconds, or like 15m, 1h, 14d), got a "
                                     "string ('soon')"),
        ("name: abc\nitems:\n  - id: 1\n  - id: x\n",
         "f.yaml:4: items[1].id: must be a whole number, got a string ('x')"),
        ("name: abc\nitems: []\n", "f.yaml:2: items: must have at least 1 item"),
        ("name: abc\nlabels: {toolong: 1}\n", "f.yaml:2: labels.toolong: must be at most 5 characters, got 7"),
        ("name: abc\nlabels: {a: [1]}\n", "f.yaml:2: labels.a: must be a string or a number, got a list"),
        ("size: 2\n", "f.yaml:1: (top level): missing required key 'name'"),
        ("- 1\n", "f.yaml:1: (top level): must be a mapping, got a list"),
    ],
    ids=["max", "bool-not-int", "str-not-float", "pattern", "choice-hint", "unknown-key-hint", "duration-min",
         "duration-bad", "nested-list-line", "min-items", "anymap-key", "scalar", "required", "top-type"],
)
def test_problem_format(text, expected):
    assert messages(text) == [expected]


def test_every_problem_is_reported_in_line_order():
    text = "size: 0\nname: 1\nbogus: x\nkind: gamma\n"
    got = messages(text)
    assert [m.split(":")[1] for m in got] == ["1", "2", "3", "4"]
    assert len(got) == 4


def test_rules_see_converted_values_and_report_paths():
    def rule(d, path, ctx):
        if d["lo"] is not None and d["hi"] is not None and d["lo"] > d["hi"]:
            ctx.error(path + ("lo",), f"must be <= hi ({d['hi']})")

    schema = Map({"lo": Field(Int()), "hi": Field(Int())}, rules=[rule])
    data, lines = load_yaml_with_lines("hi: 1\nlo: 5\n", "r.yaml")
    _, problems = validate(data, schema, "r.yaml", lines)
    assert [str(p) for p in problems] == ["r.yaml:2: lo: must be <= hi (1)"]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a: 1\na: 2\n", "f.yaml:2: a: duplicate key"),
        ("a: [1, 2\n", "f.yaml:2: malformed YAML"),
        ("base: &b {x: 1}\nother:\n  <<: *b\n", "merge keys"),
    ],
    ids=["duplicate", "malformed", "merge"],
)
def test_bad_yaml_is_a_config_error(text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_yaml_with_lines(text, "f.yaml")


def test_empty_document():
    assert load_yaml_with_lines("# nothing\n", "f.yaml")[0] is None


def test_format_path():
    assert format_path(("queues", 2, "checkpoint", "interval")) == "queues[2].checkpoint.interval"
    assert format_path(()) == "(top level)"
