"""`ckpt agent`: the node daemon (run by systemd on every compute node of a checkpointing queue)."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from ckpt_agent.adapters import control
from ckpt_agent.adapters.imds import ImdsClient
from ckpt_agent.adapters.slurm import Slurm
from ckpt_agent.checkpoint.registry import registration_dir
from ckpt_agent.commands._common import (
    add_config_args,
    load,
    make_engine,
    seconds_arg,
)
from ckpt_agent.commands._observe import install_sinks
from ckpt_agent.node.agent import Agent, NoticeHandler
from ckpt_agent.node.monitor import InterruptionMonitor
from ckpt_agent.node.privileged import PrivilegedService
from ckpt_agent.store.generations import CheckpointStore, Signer

# Written by ParallelCluster on every compute node: the Slurm node name, which differs from the host name under
# UseEc2Hostnames or a custom DNS (cookbook: slurm_plugin files; aws-parallelcluster-node: slurm_resources.py).
PCLUSTER_NODENAME_FILE = "/etc/parallelcluster/slurm_plugin/slurm_nodename"
HELP = "run the node agent: Spot notices -> final checkpoints -> drain -> requeue; privileged service for jobs"
log = logging.getLogger(__name__)
# On SIGTERM, requests in progress (a checkpoint or restore for a user's job) get this long to finish: less than
# systemd's default stop timeout (90 s), after which it would SIGKILL the agent anyway.
STOP_WAIT_SECONDS = 60


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--node", metavar="NAME",
                        help="Slurm node name (default: $SLURMD_NODENAME, else ParallelCluster's "
                             f"{PCLUSTER_NODENAME_FILE}, else the host name)")
    parser.add_argument("--poll-interval", type=seconds_arg, metavar="SECONDS", help="IMDS poll interval (default 2)")


def node_name(explicit, environ=os.environ, nodename_file: str = PCLUSTER_NODENAME_FILE) -> str:
    """The Slurm node name this agent serves: --node, $SLURMD_NODENAME, ParallelCluster's file, the host name."""
    if explicit:
        return explicit
    if environ.get("SLURMD_NODENAME"):
        return environ["SLURMD_NODENAME"]
    try:
        with open(nodename_file, encoding="utf-8") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        name = ""
    except OSError as e:
        log.error("cannot read %s (%s): using the host name as the Slurm node name", nodename_file, e.strerror)
        name = ""
    return name or socket.gethostname()


def main(args: argparse.Namespace) -> int:
    cfg = load(args)
    if args.store:
        cfg.store = args.store
    if args.poll_interval is not None:
        cfg.agent.poll_interval = args.poll_interval
    node = node_name(args.node)
    # created where the bootstrap placed none (one node); a cluster's bootstrap distributes one key to every node
    signer = Signer.ensure(cfg.agent.key_file, cfg.source)
    install_sinks(cfg)
    store = CheckpointStore(cfg.store, signer) if cfg.store else None
    slurm = Slurm.from_config(cfg)
    imds = ImdsClient(cfg.agent.imds_endpoint)
    os.makedirs(registration_dir(cfg.runtime_dir), exist_ok=True)
    os.chmod(cfg.runtime_dir, 0o755)
    os.chmod(registration_dir(cfg.runtime_dir), 0o1777)  # every user's wrapper registers here; sticky like /tmp

    agent_holder = {}
    handler = NoticeHandler(node, cfg.runtime_dir, slurm, store, cfg.agent,
                            instance=lambda: agent_holder["agent"].instance)
    agent = Agent(InterruptionMonitor(imds), handler, imds, cfg.runtime_dir, cfg.agent.poll_interval)
    agent_holder["agent"] = agent
    server = None
    if store is not None:
        engine = make_engine(cfg, store)
        service = PrivilegedService(engine, owner_of=lambda job: slurm.job_info(job).uid, node=node,
                                    requeuer=handler.requeuer)
        server = control.ControlServer(cfg.socket_path, service.handle, mode=0o666).start()
        if not engine.criu.can_dump_other_users():
            log.warning("root lacks CAP_SYS_RESOURCE here and %s lacks this project's patch 0001: CRIU cannot "
                        "checkpoint ordinary users' jobs on this machine (install it with install-criu.sh)",
                        engine.criu.binary)
    else:
        log.warning("no checkpoint store configured: ordinary users' jobs cannot be checkpointed on this node")
    agent.install_signal_handlers()
    try:
        agent.run()
    finally:
        if server:
            left = server.close(wait=STOP_WAIT_SECONDS)
            if left:
                log.error("stopping with %d request(s) for jobs still in progress after %d s", left, STOP_WAIT_SECONDS)
    return 0
