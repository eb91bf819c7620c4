"""Event sinks that talk to external systems off the critical path.

`BackgroundSink` is the one owner of "never block the caller": `__call__(record)` (what events.emit calls) turns a
record into zero or more items and puts them on a bounded queue without waiting; when the queue is full the item is
dropped and counted. One daemon thread takes items off the queue in batches and hands each batch to `send`, which
talks to the external system with its own per-call timeout. A failing `send` is logged and counted, never raised.
`close(timeout)` flushes what is queued within `timeout` seconds (the wrapper calls it at exit).

Subclasses define `items(record)` (cheap and local: no I/O) and `send(batch)`; metrics.py and notify.py are the two.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Dict, List

log = logging.getLogger(__name__)


class BackgroundSink:
    name = "sink"

    def __init__(self, max_queue: int = 1000, batch: int = 20, linger: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self.batch = batch
        self.linger = linger  # how long the worker waits for a batch to fill before it sends a partial one
        self.clock = clock
        self.dropped = 0
        self.sent = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ckpt-{self.name}", daemon=True)
        self._thread.start()

    # --- overridden -----------------------------------------------------------------------------------------------
    def items(self, record: Dict[str, Any]) -> List[Any]:
        raise NotImplementedError

    def send(self, batch: List[Any]) -> None:
        raise NotImplementedError

    # --- the caller's side: never waits -----------------------------------------------------------------------------
    def __call__(self, record: Dict[str, Any]) -> None:
        for item in self.items(record):
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    log.warning("%s: queue full, %d item(s) dropped so far", self.name, self.dropped)

    # --- the worker ---------------------------------------------------------------------------------------------
    def _take(self) -> List[Any]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        until = self.clock() + self.linger
        while len(batch) < self.batch and not self._stop.is_set():
            left = until - self.clock()
            try:
                batch.append(self.queue.get(timeout=max(0.0, left)) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                try:
                    self.send(batch)
                    self.sent += len(batch)
                except Exception as e:  # the external system's problem stays here
                    self.failures += 1
                    # once as a warning: a wrapper's warnings land in the job's own output file
                    (log.warning if self.failures == 1 else log.info)(
                        "%s: sending %d item(s) failed: %s", self.name, len(batch), e)
                for _ in batch:
                    self.queue.task_done()
            if self._stop.is_set() and self.queue.empty():
                return

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until everything queued so far was handed to `send`; True when it was."""
        end = time.monotonic() + timeout
        with self.queue.all_tasks_done:
            while self.queue.unfinished_tasks:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.queue.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float = 2.0) -> bool:
        self._stop.set()
        done = self.flush(timeout)
        self._thread.join(max(0.0, timeout) if done else 0.0)
        return done


def client_config(timeout: float):
    """botocore settings for a sink's client: short timeouts, one attempt (the next batch is the retry)."""
    from botocore.config import Config

    return Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1, "mode": "standard"})
