"""Progress of long work seen from the command line: bytes, rate and time left on a terminal, one summary line
otherwise.

`ProgressLine(stream, label, total=None)` draws `label: 1.2 GiB of ~3.0 GiB, 210 MiB/s, 0:09 left` in place
(carriage return) when `stream` is a terminal and prints nothing until `done(...)`, which always prints one line.
`sample(done_bytes)` feeds it; the rate is measured over the last few seconds. `DirectoryGrowth(path)` measures how
many bytes were added under a directory since it was created (the store's job directory during a checkpoint), with
a bounded walk so a huge or hanging directory never stalls the display.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Callable, Deque, Optional, TextIO, Tuple

from ckpt_agent.util.units import human_bytes


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class ProgressLine:
    def __init__(self, stream: TextIO, label: str, total: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, window: float = 5.0) -> None:
        self.stream = stream
        self.label = label
        self.total = total if total and total > 0 else None
        self.clock = clock
        self.window = window
        self.started = clock()
        self.samples: Deque[Tuple[float, float]] = deque([(self.started, 0.0)])
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._width = 0

    def rate(self) -> float:
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def text(self) -> str:
        done = self.samples[-1][1]
        rate = self.rate()
        parts = [f"{self.label}: {human_bytes(done)}"]
        if self.total:
            parts[0] += f" of ~{human_bytes(self.total)}"
        parts.append(f"{human_bytes(rate)}/s" if rate > 0 else "starting")
        if self.total and rate > 0:
            parts.append(f"{_clock(max(0.0, self.total - done) / rate)} left" if done < self.total else "finishing")
        parts.append(f"{_clock(self.clock() - self.started)} elapsed")
        return ", ".join(parts)

    def sample(self, done: float) -> None:
        now = self.clock()
        self.samples.append((now, float(done)))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        if self.tty:
            line = self.text()
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()
            self._width = len(line)

    def clear(self) -> None:
        """Erase the live line (a terminal's), so that what follows starts on a clean line."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def done(self, summary: str) -> None:
        """One final line (replacing the live one on a terminal)."""
        self.clear()
        self.stream.write(summary + "\n")
        self.stream.flush()


class DirectoryGrowth:
    """Bytes added under `path` since construction: apparent sizes of regular files, links not followed."""

    def __init__(self, path: str, max_entries: int = 200_000) -> None:
        self.path = path
        self.max_entries = max_entries
        self.base = self.size()

    def size(self) -> int:
        total, seen = 0, 0
        stack = [self.path]
        while stack and seen < self.max_entries:
            try:
                with os.scandir(stack.pop()) as it:
                    for entry in it:
                        seen += 1
                        try:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append(entry.path)
                            elif entry.is_file(follow_symlinks=False):
                                total += entry.stat(follow_symlinks=False).st_size
                        except OSError:
                            continue
            except OSError:
                continue
        return total

    def grown(self) -> int:
        return max(0, self.size() - self.base)


RESTORE_BASES = ("/dev/shm/ckpt-agent", "/var/tmp/ckpt-agent")  # engine._restore_base's choices


class RestoreProgress:
    """While a restore runs: on a terminal, the bytes of images rebuilt in the restore's staging directory against
    the newest checkpoint's image sizes. A context manager; it draws nothing when `stream` is not a terminal (the
    wrapper's one `ckpt: resumed ...` line is the summary) or the staging directory is not readable (the agent
    restores an ordinary user's job in a directory only root reads)."""

    def __init__(self, stream: TextIO, job_id: str, step: str, total: Optional[float], tick: float = 0.5,
                 bases=RESTORE_BASES) -> None:
        self.line = ProgressLine(stream, f"restoring job {job_id} step {step}", total)
        self.pattern = f"{job_id}.{step}.restore."
        self.tick = tick
        self.bases = bases
        self._stop = None
        self._thread = None

    def _stage_bytes(self) -> int:
        total = 0
        for base in self.bases:
            try:
                names = [n for n in os.listdir(base) if n.startswith(self.pattern)]
            except OSError:
                continue
            for name in names:
                total += DirectoryGrowth(os.path.join(base, name)).base
        return total

    def _run(self) -> None:
        self.line.sample(0)
        while not self._stop.wait(self.tick):
            self.line.sample(self._stage_bytes())

    def __enter__(self) -> RestoreProgress:
        import threading

        if self.line.tty:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="restore-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(5)
            self.line.clear()


def newest_image_bytes(store, job_id: str, step: str) -> Optional[float]:
    """The newest generation's image sizes (what a restore rebuilds); None when it cannot be read."""
    try:
        gens = store.generations(job_id, step)
        if not gens:
            return None
        manifest = store.load_manifest(gens[-1])
        return float(manifest.image_bytes())
    except Exception:  # an estimate only: a damaged newest generation is the restore's business
        return None
