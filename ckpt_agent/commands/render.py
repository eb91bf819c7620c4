"""`ckpt render SITE.yaml [--out DIR]`: write cluster.yaml and every node file from a site file.

An invalid site file prints every problem on stderr (as `ckpt validate` does) and exits 2; nothing is written.
The default output directory is `rendered/<cluster name>` next to the site file.
"""

from __future__ import annotations

import os
import sys

from ..errors import EXIT_USAGE
from ..render import render_site, write_tree
from ..site import SiteInvalid, load_site

HELP = "render the ParallelCluster config and node files from a site file"


def default_out_dir(site_path: str, site) -> str:
    return os.path.join(os.path.dirname(site_path) or ".", "rendered", site["cluster"]["name"])


def add_arguments(parser) -> None:
    parser.add_argument("site", metavar="SITE.yaml", help="the site file")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: rendered/<cluster> next to SITE)")


def main(args) -> int:
    try:
        site = load_site(args.site)
    except SiteInvalid as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    out = args.out or default_out_dir(args.site, site)
    files = write_tree(out, render_site(site, os.path.basename(args.site)))
    for rel in files:
        print(os.path.join(out, rel))
    return 0
