"""`ckpt render SITE.yaml [--out DIR]`: write cluster.yaml and every node file from a site file.

An invalid site file prints every problem on stderr (as `ckpt validate` does) and exits 2; nothing is written.
The default output directory is `rendered/<cluster name>` next to the site file.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..errors import EXIT_USAGE
from ..render import render_site, write_tree
from ._common import load_site_or_print

HELP = "render the ParallelCluster config and node files from a site file"


def default_out_dir(site_path: str, site) -> str:
    return os.path.join(os.path.dirname(site_path) or ".", "rendered", site["cluster"]["name"])


def add_arguments(parser) -> None:
    parser.add_argument("site", metavar="SITE.yaml", help="the site file")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: rendered/<cluster> next to SITE)")


def render_to(site_path: str, out: Optional[str]) -> Optional[Tuple[dict, str, List[str]]]:
    """Validate and render a site file: (site, output dir, files written); None after printing every problem."""
    site = load_site_or_print(site_path)
    if site is None:
        return None
    out = out or default_out_dir(site_path, site)
    return site, out, write_tree(out, render_site(site, os.path.basename(site_path)))


def main(args) -> int:
    rendered = render_to(args.site, args.out)
    if rendered is None:
        return EXIT_USAGE
    _, out, files = rendered
    for rel in files:
        print(os.path.join(out, rel))
    return 0
