"""A small strict YAML schema engine that remembers where every value came from.

Contract:
- `read_config_text(path, what)` reads a configuration file defensively: a regular file only (a FIFO is refused, not
  waited on), at most MAX_CONFIG_BYTES, UTF-8 text; every other case is one ConfigError line (missing: the caller's
  FileNotFoundError).
- `load_yaml_with_lines(text, source)` parses YAML into plain Python values plus a `Lines` record of the line of each
  value (and of each mapping key), addressed by path tuples such as ("queues", 2, "checkpoint", "interval").
  Malformed YAML and duplicate keys raise ConfigError naming FILE:LINE. Hostile YAML is bounded before it is built:
  nesting deeper than MAX_DEPTH, more than MAX_ALIASES aliases (billion laughs) or more than MAX_NODES values
  (aliases expanded) is a ConfigError. Numbers must be finite wherever a spec asks for one (.inf and .nan refused).
- A schema is built from `Map`, `List`, `Str`, `Int`, `Float`, `Bool`, `Duration` and `AnyMap` specs. `validate(...)`
  walks the data once and collects *every* problem as a `Problem(file, line, path, message)`; it never stops at the
  first. It returns the data with defaults filled in and durations converted to seconds.
- Cross-field rules are plain functions attached to a `Map`; they receive the converted mapping and a `Context` to
  report problems at any path below it.

`str(problem)` is the one-line format the CLI prints: `FILE:LINE: key.path: message`.
"""

from __future__ import annotations

import difflib
import errno
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Sequence, Tuple
from typing import List as ListT

import yaml

from ckpt_agent.errors import ConfigError

Path = Tuple[Any, ...]

MAX_CONFIG_BYTES = 1 << 20  # the largest real site file is ~10 KB; a bound keeps a 50 MB file from being parsed
MAX_DEPTH = 64  # mappings and lists nested this deep are no configuration (and would exhaust Python's recursion)
MAX_ALIASES = 32  # YAML anchors are handy a few times; hundreds are an alias bomb
MAX_NODES = 100_000  # values after expanding aliases

_MISSING = object()


def format_path(path: Path) -> str:
    """("queues", 2, "checkpoint") -> "queues[2].checkpoint"; the empty path is "(top level)"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path}: {self.message}"


class Lines:
    """Line numbers (1-based) of values and mapping keys, by path."""

    def __init__(self) -> None:
        self.value: Dict[Path, int] = {}
        self.key: Dict[Path, int] = {}

    def of_value(self, path: Path) -> int:
        """The line of the value at `path`, else of its nearest recorded ancestor, else 1."""
        p = tuple(path)
        while p:
            if p in self.value:
                return self.value[p]
            p = p[:-1]
        return self.value.get((), 1)

    def of_key(self, path: Path) -> int:
        return self.key.get(tuple(path)) or self.of_value(path)


def read_config_text(path: str, what: str = "configuration file") -> str:
    """The text of a configuration file (see the module docstring); FileNotFoundError when it does not exist."""
    from ckpt_agent.util.safeio import NotRegularFile, read_regular

    try:
        data = read_regular(path, MAX_CONFIG_BYTES, follow=True)  # an admin may link a config: it is theirs
    except FileNotFoundError:
        raise
    except NotRegularFile as e:
        if e.errno == errno.EFBIG:
            raise ConfigError(f"{path}: {what} is larger than {MAX_CONFIG_BYTES >> 10} KiB: refusing to read "
                              "it") from None
        raise ConfigError(f"{path}: {what} is not a regular file (a FIFO, device or directory?)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from e
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: {what} is UTF-16 text: save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (a binary file?): bad byte at offset {e.start}") from None


def _check_bounds(text: str, source: str) -> None:
    """Refuse deep nesting and alias bombs from the event stream (PyYAML's parser is not recursive)."""
    depth = aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise ConfigError(f"{source}:{event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise ConfigError(f"{source}:{event.start_mark.line + 1}: more than {MAX_ALIASES} aliases (*name): "
                                  "refusing a possible alias bomb")


def load_yaml_with_lines(text: str, source: str) -> Tuple[Any, Lines]:
    """Parse one YAML document into plain values and the line of each; ConfigError on malformed YAML."""
    lines = Lines()
    loader = None
    try:
        _check_bounds(text, source)
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, lines
        return _convert(loader, node, (), lines, source, [0]), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from e
    except (ValueError, OverflowError, RecursionError) as e:  # a scalar PyYAML cannot build, e.g. a date 99999-01-01
        raise ConfigError(f"{source}: malformed YAML: {e}") from e
    finally:
        if loader is not None:
            loader.dispose()


def _convert(loader: yaml.SafeLoader, node: yaml.Node, path: Path, lines: Lines, source: str, count: list) -> Any:
    count[0] += 1
    if count[0] > MAX_NODES:
        raise ConfigError(f"{source}: more than {MAX_NODES} values (aliases expanded): refusing a possible alias bomb")
    lines.value[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: Dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: malformed YAML: keys must be scalars")
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise ConfigError(f"{source}:{key_node.start_mark.line + 1}: merge keys (<<) are not supported")
            key = loader.construct_object(key_node)
            if key in out:
                raise ConfigError(
                    f"{source}:{key_node.start_mark.line + 1}: {format_path(path + (key,))}: duplicate key"
                )
            lines.key[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _convert(loader, value_node, path + (key,), lines, source, count)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, item, path + (i,), lines, source, count) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


class Context:
    """Collects problems while validating one file."""

    def __init__(self, source: str, lines: Lines) -> None:
        self.source = source
        self.lines = lines
        self.problems: ListT[Problem] = []
        self._failed: set = set()

    def error(self, path: Path, message: str, *, at_key: bool = False) -> None:
        line = self.lines.of_key(path) if at_key else self.lines.of_value(path)
        self.problems.append(Problem(self.source, line, format_path(path), message))
        self._failed.add(tuple(path))

    def failed(self, path: Path) -> bool:
        """Whether a problem was already reported at `path` or below (rules use it to avoid piling on)."""
        p = tuple(path)
        return any(f[: len(p)] == p for f in self._failed)

    def sorted_problems(self) -> ListT[Problem]:
        return sorted(set(self.problems), key=lambda p: (p.line, p.path, p.message))


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value!r})".lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"{type(value).__name__} {value!r}"


class Spec:
    """Base of all specs: `check` returns the converted value, or _MISSING after reporting a problem."""

    def check(self, value: Any, path: Path, ctx: Context) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class Str(Spec):
    def __init__(
        self,
        *,
        pattern: str | None = None,
        pattern_help: str = "",
        choices: Sequence[str] | None = None,
        max_len: int | None = None,
        min_len: int = 1,
    ) -> None:
        self.pattern = re.compile(pattern) if pattern else None
        self.pattern_help = pattern_help
        self.choices = tuple(choices) if choices else None
        self.max_len = max_len
        self.min_len = min_len

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if not isinstance(value, str):
            ctx.error(path, f"must be a string, got {_type_name(value)}")
            return _MISSING
        if self.choices is not None:
            if value not in self.choices:
                hint = difflib.get_close_matches(value, self.choices, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                ctx.error(path, f"must be one of {', '.join(self.choices)}, got {value!r}{extra}")
                return _MISSING
            return value
        if len(value) < self.min_len:
            ctx.error(path, "must not be empty" if self.min_len == 1 else f"must be at least {self.min_len} characters")
            return _MISSING
        if self.max_len is not None and len(value) > self.max_len:
            ctx.error(path, f"must be at most {self.max_len} characters, got {len(value)}")
            return _MISSING
        if self.pattern is not None and not self.pattern.fullmatch(value):
            ctx.error(path, f"must be {self.pattern_help or 'matching ' + self.pattern.pattern}, got {value!r}")
            return _MISSING
        return value


class _Number(Spec):
    kind = "a number"

    def __init__(self, *, min: float | None = None, max: float | None = None, unit: str = "") -> None:
        self.min = min
        self.max = max
        self.unit = f" {unit}" if unit else ""

    def _accept(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if not self._accept(value):
            ctx.error(path, f"must be {self.kind}, got {_type_name(value)}")
            return _MISSING
        if isinstance(value, float) and not math.isfinite(value):
            ctx.error(path, f"must be a finite number, got {value!r}")
            return _MISSING
        return self._range(value, path, ctx)

    def _range(self, value: Any, path: Path, ctx: Context) -> Any:
        if self.min is not None and value < self.min:
            ctx.error(path, f"must be >= {self.min:g}{self.unit}, got {value:g}")
            return _MISSING
        if self.max is not None and value > self.max:
            ctx.error(path, f"must be <= {self.max:g}{self.unit}, got {value:g}")
            return _MISSING
        return value


class Int(_Number):
    kind = "a whole number"

    def _accept(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


class Float(_Number):
    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        out = super().check(value, path, ctx)
        return out if out is _MISSING else float(out)


_DURATION_RE = re.compile(r"(\d+)\s*(s|m|h|d)")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Duration(_Number):
    """Seconds as a whole number, or a string such as "90s", "15m", "1h", "14d"; converted to whole seconds."""

    kind = "a duration (seconds, or like 15m, 1h, 14d)"

    def __init__(self, *, min: float | None = None, max: float | None = None) -> None:
        super().__init__(min=min, max=max, unit="s")

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        seconds: Any = None
        if isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip()):
            number, unit = _DURATION_RE.fullmatch(value.strip()).groups()
            seconds = int(number) * _DURATION_UNITS[unit]
        if seconds is None:
            ctx.error(path, f"must be {self.kind}, got {_type_name(value)}")
            return _MISSING
        return self._range(seconds, path, ctx)


class Scalar(Spec):
    """A string, number or boolean, kept as written (for free-form settings such as slurm.conf parameters)."""

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            ctx.error(path, f"must be a finite number, got {value!r}")
            return _MISSING
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value
        ctx.error(path, f"must be a string or a number, got {_type_name(value)}")
        return _MISSING


class Bool(Spec):
    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if not isinstance(value, bool):
            ctx.error(path, f"must be true or false, got {_type_name(value)}")
            return _MISSING
        return value


class List(Spec):
    def __init__(self, item: Spec, *, min_items: int = 0, max_items: int | None = None, unique: bool = False):
        self.item = item
        self.min_items = min_items
        self.max_items = max_items
        self.unique = unique

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if not isinstance(value, list):
            ctx.error(path, f"must be a list, got {_type_name(value)}")
            return _MISSING
        if len(value) < self.min_items:
            ctx.error(path, f"must have at least {self.min_items} item{'s' if self.min_items != 1 else ''}")
        if self.max_items is not None and len(value) > self.max_items:
            ctx.error(path, f"must have at most {self.max_items} items, got {len(value)}")
        out = []
        seen: Dict[Any, int] = {}
        for i, item in enumerate(value):
            converted = self.item.check(item, path + (i,), ctx)
            if converted is _MISSING:
                continue
            if self.unique and isinstance(converted, (str, int, float)):
                if converted in seen:
                    ctx.error(path + (i,), f"duplicate of item [{seen[converted]}]: {converted!r}")
                    continue
                seen[converted] = i
            out.append(converted)
        return out


Rule = Callable[[Dict[str, Any], Path, Context], None]


@dataclass
class Field:
    spec: Spec
    required: bool = False
    default: Any = None  # used when absent and not required (a callable is called for a fresh value)
    fill: bool = True  # an absent optional Map section gets its defaults; False keeps it None (an either/or choice)


class Map(Spec):
    """A mapping with known keys; unknown keys are errors with a "did you mean" hint."""

    def __init__(self, fields: Dict[str, Field], *, rules: Iterable[Rule] = ()) -> None:
        self.fields = fields
        self.rules = list(rules)

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            ctx.error(path, f"must be a mapping, got {_type_name(value)}")
            return _MISSING
        out: Dict[str, Any] = {}
        for key in value:
            if key not in self.fields:
                hint = difflib.get_close_matches(str(key), list(self.fields), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(self.fields)})"
                ctx.error(path + (key,), f"unknown key{extra}", at_key=True)
        for name, fld in self.fields.items():
            if name in value:
                converted = fld.spec.check(value[name], path + (name,), ctx)
                out[name] = None if converted is _MISSING else converted
            elif fld.required:
                ctx.error(path, f"missing required key {name!r}")
                out[name] = None
            else:
                default = fld.default() if callable(fld.default) else fld.default
                if isinstance(fld.spec, Map) and default is None and fld.fill:
                    default = fld.spec.check({}, path + (name,), ctx)
                out[name] = default
        for rule in self.rules:
            rule(out, path, ctx)
        return out


class AnyMap(Spec):
    """A mapping whose keys are free-form (checked by `key`) and whose values all follow `value`."""

    def __init__(self, key: Spec, value: Spec, *, max_items: int | None = None) -> None:
        self.key = key
        self.value = value
        self.max_items = max_items

    def check(self, value: Any, path: Path, ctx: Context) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            ctx.error(path, f"must be a mapping, got {_type_name(value)}")
            return _MISSING
        if self.max_items is not None and len(value) > self.max_items:
            ctx.error(path, f"must have at most {self.max_items} entries, got {len(value)}")
        out = {}
        for key, item in value.items():
            if self.key.check(key, path + (key,), ctx) is _MISSING:
                continue
            converted = self.value.check(item, path + (key,), ctx)
            if converted is not _MISSING:
                out[key] = converted
        return out


def validate(data: Any, schema: Spec, source: str, lines: Lines) -> Tuple[Any, ListT[Problem]]:
    """Check `data` against `schema`; return (converted data, every problem sorted by line)."""
    ctx = Context(source, lines)
    out = schema.check(data, (), ctx)
    return (None if out is _MISSING else out), ctx.sorted_problems()
