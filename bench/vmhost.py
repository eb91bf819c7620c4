"""A virtual machine's host can take memory back: with free page reporting (virtio-balloon), pages the guest frees
are handed to the host, and the guest's next touch of each such page faults on the host. On this project's
Firecracker VMs that costs about 3 s per GiB touched, and it falls on whichever runs first: a checkpoint, or the dd it
is compared with (criu dump of the same 1 GiB to tmpfs: 3.4 s, then 0.65 s once the pages were backed again).

`held_page_reporting()` stops the reporting for a benchmark's duration and touches the memory the benchmark will use
once, so that neither side pays the host's faults; it puts the setting back afterwards. Nothing is done where the
kernel has no free page reporting (EC2's Nitro instances back all of a guest's memory), or without root.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from pathlib import Path
from typing import Callable, Iterator

ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
BEYOND_ANY_ORDER = 11  # above x86's MAX_PAGE_ORDER (10): no free block is that large, so none is reported
TOUCH = 2 << 20


def touch(nbytes: int) -> float:
    """Write one byte of every page of `nbytes` of fresh anonymous memory, then free it: seconds taken."""
    t = time.monotonic()
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        block = b"\1" * TOUCH
        for off in range(0, nbytes - TOUCH + 1, TOUCH):
            m[off:off + TOUCH] = block
    finally:
        m.close()
    return time.monotonic() - t


@contextlib.contextmanager
def held_page_reporting(warm_bytes: int, log: Callable[[str], None], hold: bool = True) -> Iterator[None]:
    if not hold or not ORDER.exists() or os.geteuid() != 0:
        yield
        return
    before = ORDER.read_text().strip()
    try:
        ORDER.write_text(f"{BEYOND_ANY_ORDER}\n")
        held = ORDER.read_text().strip() == str(BEYOND_ANY_ORDER)
    except OSError as e:
        log(f"free page reporting is on and could not be held ({e}): figures include the host's page faults")
        yield
        return
    try:
        if not held:
            log("free page reporting is on and could not be held: figures include the host's page faults")
        else:
            secs = touch(warm_bytes)
            log(f"free page reporting held for the benchmark (page_reporting_order {before} -> "
                f"{BEYOND_ANY_ORDER}); {warm_bytes / (1 << 30):.1f} GiB touched once in {secs:.1f} s so that the "
                f"host backs it (--leave-page-reporting: measure with the host's faults)")
        yield
    finally:
        with contextlib.suppress(OSError):
            ORDER.write_text(f"{before}\n")
