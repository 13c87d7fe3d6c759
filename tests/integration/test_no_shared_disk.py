"""Two nodes that share no disk: the worker node's ``ray start`` runs in its own mount namespace, where the driver's
working directory and this test's files are hidden under an empty tmpfs. With the run directory and the corpus on
S3 (the ``s3`` fixture), pretraining spreads over both nodes, survives the kill of the training worker on the other
node by resuming from the S3 checkpoint, and a Serve replica on that node loads the export from S3.

What it proves: no stage depends on a path only the driver's node can see (a rank-0 or driver-local write, a
relative path, a download into the driver's directory) for the paths it hides. The checkout and its virtualenv stay
visible to both, as an installed package is on every node of a real cluster.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from helpers import REPO
from helpers.cluster import LocalHead, free_ports
from helpers.result_line import read_result

from pipeline import storage

pytestmark = pytest.mark.slow


def _nodes_alive(head: LocalHead) -> int:
    result = head.python("import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))", timeout_s=120)
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0


def test_pretrain_resume_and_serve_on_nodes_that_share_no_disk(s3: str, tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.fail("needs util-linux's unshare (mount namespaces) to build a node that shares no disk")
    prefix = f"{s3}/nodisk"
    fs, path = storage.filesystem(f"{prefix}/corpus/macbeth.txt")
    corpus = REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt"
    pafs.copy_files(str(corpus), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    (driver_dir / "only-the-driver-sees-this").write_text("x")

    with LocalHead(num_cpus=1) as head:
        node = head.add_node(num_cpus=1, hidden=[tmp_path])
        try:
            deadline = time.monotonic() + 120
            while _nodes_alive(head) < 2:
                logs = "".join(p.read_text(errors="replace")[-3000:] for p in head.root.glob("node-*.log"))
                assert node.poll() is None, f"the worker node exited:\n{logs}"
                assert time.monotonic() < deadline, "the worker node did not join"
                time.sleep(2)
            # the worker node really cannot see the driver's files
            probe = subprocess.run(
                ["nsenter", "--target", str(node.pid), "--mount", "ls", "-A", str(tmp_path)],
                capture_output=True,
                text=True,
            )
            assert probe.returncode == 0 and probe.stdout.strip() == "", probe
            env = head.env()
            env["RAY_ADDRESS"] = head.gcs_address
            (port,) = free_ports(1)
            driver = subprocess.run(
                [sys.executable, str(REPO / "tests" / "helpers" / "no_shared_disk_driver.py"), prefix, str(port)],
                env=env,
                cwd=driver_dir,
                capture_output=True,
                text=True,
                timeout=1500,
            )
        finally:
            node.terminate()
    result = read_result(driver.stdout)
    assert driver.returncode == 0 and result, driver.stdout[-4000:] + driver.stderr[-8000:]
    print(f"\nno shared disk: {result}")
    assert result["error"] is None and result["steps"] == 6
    assert result["train_nodes"] == result["nodes"]  # one rank on each node
    assert result["killed_on"] == result["worker_node"] and 0 < result["resumable"] < 6
    assert result["workers_started"] == 4  # the group of 2, and a restarted group of 2
    assert result["metric_steps"] == list(range(1, 7))
    assert result["export"].startswith(prefix)
    assert result["replicas_answering"] == 2 and result["worker_node"] in result["replica_nodes"]
