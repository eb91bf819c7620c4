"""Transparent checkpoint/restore of long-running batch jobs on EC2 Spot, on CRIU and Slurm."""

from pathlib import Path

__version__ = "0.1.0"

# The package's own directory: templates, bootstrap scripts and the node wheel are found from here.
PACKAGE_DIR = Path(__file__).resolve().parent
