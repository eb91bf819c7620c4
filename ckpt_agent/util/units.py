"""How sizes and moments are shown to people: one format for every command; the bounds every duration given to us
obeys."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Union

# the longest wait or interval we take: a year (nan, inf or 1e300 would overflow timers and kill threads)
MAX_SECONDS = 365 * 24 * 3600.0


def check_seconds(value: Any, what: str) -> float:
    """`value` as seconds: a finite number > 0 and <= MAX_SECONDS; ValueError naming `what` otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"{what}: must be a finite number of seconds, > 0 and <= {MAX_SECONDS:.0f}, got {value!r}")
    return seconds


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; bytes below 1 KiB as a whole number."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def iso_seconds(t: Union[dt.datetime, float]) -> str:
    """A moment (an aware datetime, or epoch seconds) as the events and reports write it: "2026-12-03T06:46:47Z"."""
    if not isinstance(t, dt.datetime):
        t = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
