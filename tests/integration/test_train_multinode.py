"""Training across two Ray nodes: the two ZeRO-3 ranks run on different nodes and training completes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.result_line import read_result

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def test_two_workers_on_two_nodes(tmp_path: Path) -> None:
    # Its own process: this cluster must not meet the session's shared local Ray.
    result = subprocess.run(
        [sys.executable, str(HELPERS / "multinode_pretrain.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    outcome = read_result(result.stdout)
    assert result.returncode == 0 and outcome, result.stdout[-3000:] + result.stderr[-3000:]
    assert outcome["steps"] == 2
    assert len(outcome["nodes"]) == 2
    assert sorted(set(outcome["node_ids"])) == outcome["nodes"]  # one rank on each node
