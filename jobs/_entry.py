"""Shared by the job entrypoints: run one ``raygpt`` command inside a Ray job and exit with its status.

``ray job submit --working-dir . -- python jobs/X.py --config cluster.yaml [--set k=v ...]`` runs X.py in the
uploaded checkout on the cluster; the job system sets RAY_ADDRESS, which ``pipeline.raycluster.connect`` joins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """``raygpt <command> <argv>`` (argv defaults to this script's arguments); returns the exit status."""
    # `python jobs/X.py` puts jobs/ first on sys.path, where jobs/tokenize.py would shadow the standard library's
    # `tokenize` (imported by inspect, linecache, torch ...). Import from the checkout root instead, so the job
    # runs the uploaded code, not whatever raygpt the node has installed.
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.join(ROOT, "jobs"):
        sys.path[0] = ROOT
    else:
        sys.path.insert(0, ROOT)
    if not os.environ.get("RAY_ADDRESS"):
        print(
            "raygpt job: RAY_ADDRESS is not set (not started by `ray job submit`); using run.ray_address or a "
            "local Ray",
            file=sys.stderr,
        )
    from pipeline.cli import main

    args = list(sys.argv[1:] if argv is None else argv)
    return main([*command, *args])
