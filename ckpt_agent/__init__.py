"""Transparent checkpoint/restore of long-running batch jobs on EC2 Spot, on CRIU and Slurm."""

__version__ = "0.1.0"
