"""Local stand-ins for the cloud, used by the tests and by `make demo`: a real Slurm cluster on one machine
(`slurm_cluster.LocalCluster`), an EC2 metadata service per simulated node (`imds_server.ImdsServer`), and what
stops a cluster whose owner is gone (`reaper`).

Nothing here runs on a real cluster node; the node agent only talks to these through the same adapters
(`ckpt_agent.adapters.slurm.Slurm`, `ckpt_agent.adapters.imds.ImdsClient`) it uses on EC2.
"""
