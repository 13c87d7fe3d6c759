"""cluster.yaml's autoscaling, on this machine: a `fake_multinode` cluster config derived from cluster.yaml's node
types (provider swapped, resources scaled down; tests/helpers/autoscaling.py), a head with no workers, a job that
needs more CPUs than the head has; the autoscaler adds worker nodes, the job completes, and the idle workers are
removed afterwards. Runs its own cluster in subprocesses (never the session-wide `ray_session`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from helpers.autoscaling import FAKE_HEAD_TYPE, alive_nodes, autoscaling_head, fake_cluster_config
from helpers.cluster import tagged_pids, wait_for_job
from helpers.result_line import read_result


def test_fake_config_keeps_cluster_yaml_node_types_and_validates() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    config = fake_cluster_config(REPO / "cluster.yaml", "127.0.0.1:6379")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    source = yaml.safe_load((REPO / "cluster.yaml").read_text())
    workers = {name for name in source["available_node_types"] if name != source["head_node_type"]}
    assert set(config["available_node_types"]) == workers | {FAKE_HEAD_TYPE}
    for name in workers:
        derived, original = config["available_node_types"][name], source["available_node_types"][name]
        assert derived["min_workers"] == original["min_workers"]
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find the cluster's processes")
@pytest.mark.parametrize("autoscaler_v2", [True, False], ids=["autoscaler-v2", "autoscaler-v1"])
def test_autoscaler_adds_workers_for_a_job_and_removes_them_when_idle(autoscaler_v2: bool) -> None:
    """`ray up` runs autoscaler v2 (RAY_UP_enable_autoscaler_v2 defaults to 1); `ray start --autoscaling-config`
    without it runs v1: both must scale cluster.yaml's node types."""
    members = 3  # 3 CPUs held at once; the head has 1, each cpu_worker 1
    head = autoscaling_head(autoscaler_v2)
    try:
        head.start()
        assert len(alive_nodes(head)) == 1  # the head alone: min_workers are 0

        submission_id = "raygpt-autoscale"
        submitted = head.ray(
            "job",
            "submit",
            "--address",
            head.dashboard_url,
            "--submission-id",
            submission_id,
            "--no-wait",
            "--",
            "python",
            str(REPO / "tests" / "helpers" / "autoscale_probe.py"),
            str(members),
            "240",
        )
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        status, output = wait_for_job(head, submission_id, 300)
        assert status == "SUCCEEDED", f"job ended {status}:\n{output[-5000:]}\n{head.log()}"
        result = read_result(output)
        assert result, output[-3000:]
        assert len(result["start_nodes"]) == 1
        assert len(set(result["member_nodes"])) == members  # one actor per node: 2 nodes were added
        assert len(result["alive_nodes"]) >= members
        assert result["cluster_cpus"] >= members
        added = set(result["member_nodes"]) - set(result["start_nodes"])
        # CPU demand brings cpu_worker nodes, not the (scarcer) gpu_worker type.
        assert all(not result["node_resources"][node].get("GPU") for node in added), result["node_resources"]

        # Idle workers go after idle_timeout_minutes.
        deadline = time.monotonic() + 180
        alive = alive_nodes(head)
        while len(alive) > 1 and time.monotonic() < deadline:
            time.sleep(5)
            alive = alive_nodes(head)
        assert alive == result["start_nodes"], f"workers not removed: {alive}\n{head.log()}"
    finally:
        head.stop()
    assert tagged_pids(head.tag) == []
