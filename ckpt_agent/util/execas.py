"""`python -m ckpt_agent.util.execas --cgroup-of PID -- CMD...`: exec CMD in the cgroups of process PID (so that
`criu restore --manage-cgroups=ignore` puts the restored tree into the new job's cgroups)."""

import argparse
import os

from ckpt_agent.util.usercreds import join_cgroups_of


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ckpt_agent.util.execas")
    parser.add_argument("--cgroup-of", type=int)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command")
    if args.cgroup_of:
        join_cgroups_of(args.cgroup_of)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
