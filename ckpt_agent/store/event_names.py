"""The names of lifecycle events: the one place they are spelled. Every emitter (`events.emit`, gc's removal log)
and every reader (report, metrics, notifications, the demo) uses these constants; tests/store/test_event_names.py
checks that no other event name is emitted or compared anywhere in the code.

Job events (what happened to a job as a whole, on a node): NOTICE_RECEIVED, REBALANCE_RECEIVED, DRAINED, REQUEUED,
REQUEUE_FAILED, REQUEUE_EXPEDITED. Step events (one `ckpt run` wrapper): SEGMENT_STARTED, SEGMENT_ENDED, RESTORED,
RESTORE_FAILED, CHECKPOINT_STARTED, CHECKPOINT_COMMITTED, CHECKPOINT_FAILED, INTERVAL_PLANNED. Head node: GC_REMOVED.
"""

from __future__ import annotations

NOTICE_RECEIVED = "notice_received"  # a Spot interruption notice reached the node agent
REBALANCE_RECEIVED = "rebalance_received"  # a rebalance recommendation reached the node agent
DRAINED = "drained"  # the agent drained the node in Slurm
REQUEUED = "requeued"
REQUEUE_FAILED = "requeue_failed"
REQUEUE_EXPEDITED = "requeue_expedited"  # Slurm's requeue hold was cut short
SEGMENT_STARTED = "segment_started"  # a run of a step began (fresh or restored)
SEGMENT_ENDED = "segment_ended"
RESTORED = "restored"
RESTORE_FAILED = "restore_failed"
CHECKPOINT_STARTED = "checkpoint_started"
CHECKPOINT_COMMITTED = "checkpoint_committed"
CHECKPOINT_FAILED = "checkpoint_failed"
FINAL_SKIPPED = "final_skipped"  # on a notice, a final checkpoint that could not fit was skipped (runner.py)
INTERVAL_PLANNED = "interval_planned"  # the planner chose the next periodic checkpoint interval
GC_REMOVED = "gc_removed"  # the head node's gc removed a job, generation or partial checkpoint

# events about the job as a whole (no step)
JOB_EVENTS = (NOTICE_RECEIVED, REBALANCE_RECEIVED, DRAINED, REQUEUED, REQUEUE_FAILED)

ALL_EVENTS = frozenset(v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str))
