"""`python -m ckpt_agent.cgexec PID -- CMD...`: run CMD in the cgroups of process PID (used to run `criu restore`
inside a job's cgroups, so the restored tree belongs to the new Slurm job)."""

import os
import sys

from .usercreds import join_cgroups_of


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.stderr.write("usage: python -m ckpt_agent.cgexec PID -- CMD [ARGS...]\n")
        sys.exit(2)
    join_cgroups_of(int(sys.argv[1]))
    os.execvp(sys.argv[3], sys.argv[3:])


if __name__ == "__main__":
    main()
