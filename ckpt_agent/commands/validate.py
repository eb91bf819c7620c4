"""`ckpt validate SITE.yaml`: check an admin's site file strictly before anything is rendered or uploaded.

Prints every problem on stdout, one a line, as `FILE:LINE: key.path: message`, and exits 2; exits 0 with a one-line
summary when the file is valid. A file that cannot be read or is not YAML at all is one such problem (exit 2 too:
`ckpt validate` answers "is this site file good", whatever is wrong with it).
With --pcluster, the cluster.yaml it renders is also checked against ParallelCluster's own schema (needs the
optional aws-parallelcluster package; no AWS access). Whether each queue's largest job's final checkpoint fits the
notice is a warning (exit 0), from FSx's published throughput, or with --measured from what a node measured (the
record `bench/checkpoint_bench.py --plan-inputs FILE` writes; a bad record is one line, exit 78, as in `ckpt plan`).
"""

from __future__ import annotations

import os
import sys

from ckpt_agent.errors import EXIT_USAGE, ConfigError, UsageError
from ckpt_agent.site.schema import SiteInvalid, load_site

HELP = "check a site file (the admin YAML) and list every problem"


def add_arguments(parser) -> None:
    parser.add_argument("site", metavar="SITE.yaml", help="the site file, e.g. cluster-configs/site.example.yaml")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is valid")
    parser.add_argument(
        "--pcluster", action="store_true", help="also check the rendered cluster.yaml with ParallelCluster's schema"
    )
    parser.add_argument("--measured", metavar="FILE",
                        help="size final checkpoints with the figures one node measured (as `ckpt plan --measured`)")


def main(args) -> int:
    from ckpt_agent.checkpoint.planner import load_measured

    measured = load_measured(args.measured) if args.measured else {}  # a bad record: ConfigError, one line, 78
    try:
        site = load_site(args.site)
    except SiteInvalid as e:
        for problem in e.problems:
            print(problem)
        return EXIT_USAGE
    except ConfigError as e:  # unreadable, or not YAML: the file's one problem
        print(e)
        return EXIT_USAGE
    _warn_unless_final_checkpoints_fit(site, measured, args.measured)
    if args.pcluster:
        from ckpt_agent.site.pcluster_check import check_schema
        from ckpt_agent.site.render import render_site

        text = render_site(site, os.path.basename(args.site))["cluster.yaml"]
        problems = check_schema(text, cluster_name=site["cluster"]["name"], region=site["cluster"]["region"])
        for problem in problems:
            print(f"{args.site}: rendered cluster.yaml: {problem}")
        if problems:
            return EXIT_USAGE
    if not args.quiet:
        queues = site["queues"]
        spot = sum(1 for q in queues if q["capacity"] == "spot")
        checked = " (and ParallelCluster's schema)" if args.pcluster else ""
        print(f"{args.site}: valid{checked}: cluster {site['cluster']['name']}, {len(queues)} queues ({spot} on Spot)")
    return 0


def _warn_unless_final_checkpoints_fit(site, measured, measured_path) -> None:
    """Warnings, not problems (exit 0): the site is valid, but its largest jobs' final checkpoints would be cut off
    when a quarter of a queue is reclaimed at once (`ckpt plan` explains and takes other assumptions). The worst
    case: a full final (a job reclaimed before its first periodic checkpoint), with the node's measured figures
    where given."""
    from ckpt_agent.checkpoint.planner import advice, measured_inputs, plan_site

    figures = f"; node figures from {measured_path}" if measured else ""
    try:
        plans = plan_site(site, measured_inputs(measured))
    except UsageError as e:
        print(f"note: final-checkpoint sizing skipped ({e}); see `ckpt plan`", file=sys.stderr)
        return
    for p in plans:
        if not p.fits:
            print(f"warning: queue {p.queue}: a final checkpoint of a {p.job_memory_gib:g} GiB job "
                  f"{advice(p, site)} (see `ckpt plan`{figures})", file=sys.stderr)
