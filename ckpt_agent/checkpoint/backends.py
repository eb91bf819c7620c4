"""How `ckpt run` gets its privileged work done: itself when it runs as root, through the node agent otherwise.

Both offer the same three operations, so the wrapper's logic does not depend on who holds the privileges.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional

from ckpt_agent.adapters import control
from ckpt_agent.checkpoint import launcher
from ckpt_agent.checkpoint.engine import (
    CheckpointResult,
    Engine,
    JobState,
    RestoreResult,
)

PIPE_ORDER = ("stdout", "stderr", "status")


class LocalBackend:
    """Root: CRIU runs in the wrapper's own process tree; launched and restored trees are its children."""

    owns_children = True

    def __init__(self, engine: Engine):
        self.engine = engine
        launcher.become_subreaper()
        engine.sweep_staging()  # images a killed wrapper left in /dev/shm (RAM) go at the next start

    def launch(self, argv: List[str], cwd: str, env: Mapping[str, str], pipes: Dict[str, int], job_id: str,
               step: str) -> int:
        pid = launcher.launch(argv, cwd, env, pipes["stdout"], pipes["stderr"], pipes["status"])
        self.engine.warm_up()  # measured while the tool runs, not inside its first checkpoint
        return pid

    def restore(self, job_id: str, step: str, pipes: Dict[str, int]) -> RestoreResult:
        res = self.engine.restore(job_id, step, pipes)
        self.engine.warm_up()  # after the restore, which is bound by the CPU too
        return res

    def checkpoint(self, job: JobState, *, final: bool, reason: str, timeout: Optional[float]) -> CheckpointResult:
        return self.engine.checkpoint(job, final=final, reason=reason, timeout=timeout)

    def wait_cleanups(self, timeout: float) -> bool:
        """The store's cleanup after a final checkpoint runs after its reply: let it end before the wrapper does."""
        return self.engine.wait_cleanups(timeout)


class AgentBackend:
    """An ordinary user: the node agent (root) launches, checkpoints and restores on the job's behalf."""

    owns_children = False

    def __init__(self, socket_path: str):
        self.socket_path = socket_path

    def _call(self, payload: Dict[str, Any], fds=()) -> Dict[str, Any]:
        return control.raise_for_reply(control.request(self.socket_path, payload, fds=fds), "node agent: ")

    def launch(self, argv: List[str], cwd: str, env: Mapping[str, str], pipes: Dict[str, int], job_id: str,
               step: str) -> int:
        reply = self._call({"op": "launch", "job_id": job_id, "step": step, "argv": list(argv), "cwd": cwd,
                            "env": dict(env)}, [pipes[k] for k in PIPE_ORDER])
        return int(reply["init_pid"])

    def restore(self, job_id: str, step: str, pipes: Dict[str, int]) -> RestoreResult:
        reply = self._call({"op": "restore", "job_id": job_id, "step": step}, [pipes[k] for k in PIPE_ORDER])
        return RestoreResult(pid=int(reply["pid"]), generation=int(reply["generation"]), created=reply["created"],
                             skipped=[tuple(s) for s in reply.get("skipped", [])], seconds=float(reply["seconds"]),
                             files_written=int(reply.get("files_written", 0)))

    def checkpoint(self, job: JobState, *, final: bool, reason: str, timeout: Optional[float]) -> CheckpointResult:
        reply = self._call({
            "op": "checkpoint", "job_id": job.job_id, "step": job.step, "init_pid": job.init_pid, "cwd": job.cwd,
            "argv": job.argv, "pipe_inodes": job.pipe_inodes, "exclude": sorted(job.exclude), "node": job.node,
            "instance": job.instance, "final": final, "reason": reason, "timeout": timeout,
        })
        # a field with a default may be missing from an older agent's reply; the others may not
        fields = dataclasses.fields(CheckpointResult)
        return CheckpointResult(**{f.name: reply[f.name] for f in fields
                                   if f.name in reply or f.default is dataclasses.MISSING})

    def wait_cleanups(self, timeout: float) -> bool:
        return True  # the agent, which outlives the wrapper, cleans up after its checkpoints


def choose_backend(engine_factory, socket_path: str):
    """Root runs CRIU itself; anybody else needs the node agent's socket."""
    if os.geteuid() == 0:
        return LocalBackend(engine_factory())
    if not os.path.exists(socket_path):
        from ckpt_agent.errors import AgentUnreachable

        raise AgentUnreachable(
            f"ckpt run as an ordinary user needs the node agent, but its socket {socket_path} does not exist "
            "(is ckpt-agent running on this node?)"
        )
    return AgentBackend(socket_path)
