"""`ckpt render SITE.yaml [--out DIR]`: write cluster.yaml and every node file from a site file.

An invalid site file prints every problem on stderr (as `ckpt validate` does) and exits 2; nothing is written.
The default output directory is `rendered/<cluster name>` next to the site file.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ckpt_agent.commands._common import load_site_or_print
from ckpt_agent.errors import EXIT_USAGE
from ckpt_agent.site.render import render_cluster_files, render_node_files, write_tree

HELP = "render the ParallelCluster config and node files from a site file"


def default_out_dir(site_path: str, site) -> str:
    return os.path.join(os.path.dirname(site_path) or ".", "rendered", site["cluster"]["name"])


def add_arguments(parser) -> None:
    parser.add_argument("site", metavar="SITE.yaml", help="the site file")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: rendered/<cluster> next to SITE)")


def render_to(site_path: str, out: Optional[str], wheel: Optional[str] = None
              ) -> Optional[Tuple[dict, str, List[str], str]]:
    """Validate and render a site file: (site, output dir, files written, bundle version); None after printing
    every problem. The bundle version is the content hash of what `ckpt upload` ships (with `wheel`, or the wheel
    built from this installation), so cluster.yaml changes exactly when the nodes' bundle does."""
    site = load_site_or_print(site_path)
    if site is None:
        return None
    from ckpt_agent.site.upload import bundle_version

    out = out or default_out_dir(site_path, site)
    name = os.path.basename(site_path)
    node_files = render_node_files(site, name)
    version = bundle_version(site, node_files, wheel)
    files = {**render_cluster_files(site, name, version), **node_files}
    return site, out, write_tree(out, files), version


def main(args) -> int:
    rendered = render_to(args.site, args.out)
    if rendered is None:
        return EXIT_USAGE
    _, out, files, _ = rendered
    for rel in files:
        print(os.path.join(out, rel))
    return 0
