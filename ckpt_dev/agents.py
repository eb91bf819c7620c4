"""A node agent per Slurm node of the local cluster, each with its own IMDS endpoint, as on a real cluster where
every instance has its own metadata service. Used by the end-to-end tests and by `make demo`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Dict, Mapping, Optional

from ckpt_dev.imds_server import ImdsServer
from ckpt_dev.slurm_cluster import ClusterError

START_TIMEOUT_SECONDS = 30


class NodeAgents:
    """`ckpt agent` processes (from `bin_dir`, the shared venv) for every node of `cluster`."""

    def __init__(self, cluster, bin_dir: str, *, poll_interval: float = 0.5, instance_type: str = "r6i.large",
                 extra_config: Optional[Mapping[str, object]] = None, extra_env: Optional[Mapping[str, str]] = None):
        self.cluster = cluster
        self.bin_dir = bin_dir
        self.poll_interval = poll_interval
        self.instance_type = instance_type
        self.extra_config = dict(extra_config or {})  # top-level keys replace ours; "agent" keys are merged
        self.extra_env = dict(extra_env or {})  # e.g. a PATH whose scontrol is slow, for the agents only
        self.dir = os.path.join(cluster.workdir, "agent")
        self.key = cluster.key_file  # one key for the cluster: any node restores any checkpoint
        self.imds: Dict[str, ImdsServer] = {}
        self.procs: Dict[str, subprocess.Popen] = {}

    def config_path(self, node: str) -> str:
        return os.path.join(self.dir, f"{node}.yaml")

    def log_path(self, node: str) -> str:
        return os.path.join(self.cluster.log_dir, f"agent-{node}.log")

    def start(self) -> NodeAgents:
        """Start an IMDS endpoint and an agent per node; on any failure stop what was started, then raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        for i, node in enumerate(self.cluster.nodes):
            imds = ImdsServer(instance_id=f"i-0{i + 1}{'0' * 15}", instance_type=self.instance_type).start()
            self.imds[node] = imds
            config = {
                "store": self.cluster.store,
                "runtime_dir": self.cluster.runtime_dir(node),
                "criu": shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/usr/bin") or "criu",
                "agent": {"poll_interval": self.poll_interval, "key_file": self.key, "imds_endpoint": imds.url},
            }
            extra = dict(self.extra_config)
            config["agent"].update(extra.pop("agent", {}))
            config.update(extra)
            with open(self.config_path(node), "w") as fh:
                json.dump(config, fh)
            self._spawn(node)

    def _spawn(self, node: str) -> None:
        env = self.cluster.env({"CKPT_CONFIG": self.config_path(node), **self.extra_env})
        for var in ("CKPT_STORE", "CKPT_RUNTIME_DIR", "AWS_EC2_METADATA_SERVICE_ENDPOINT"):
            env.pop(var, None)
        with open(self.log_path(node), "ab") as log:
            # own session, like the cluster's daemons: Ctrl-C in a terminal reaches the demo or test, which
            # stops the agents in order, not the agents themselves in the middle of a checkpoint
            self.procs[node] = subprocess.Popen([os.path.join(self.bin_dir, "ckpt"), "agent", "--node", node],
                                                env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self._wait_socket(node)

    def restart(self, node: str) -> None:
        """Stop one node's agent (SIGTERM, as systemd does) and start it again with the same configuration, the
        way `systemctl restart` or `Restart=` does on a node: its runtime directory is kept."""
        proc = self.procs[node]
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._spawn(node)

    def _wait_socket(self, node: str) -> None:
        sock = os.path.join(self.cluster.runtime_dir(node), "agent.sock")
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not os.path.exists(sock):
            if self.procs[node].poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"the agent of {node} did not start: {self.log_tail(node)}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for imds in self.imds.values():
            imds.stop()

    def log_tail(self, node: str, chars: int = 2000) -> str:
        try:
            with open(self.log_path(node), errors="replace") as fh:
                return fh.read()[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> NodeAgents:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
