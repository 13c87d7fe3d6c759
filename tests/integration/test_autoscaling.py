"""cluster.yaml's autoscaling, on this machine: a `fake_multinode` cluster config derived from cluster.yaml's node
types (provider swapped, resources scaled down), a head with no workers, a job that needs more CPUs than the head
has; the autoscaler adds worker nodes, the job completes, and the idle workers are removed afterwards.

The ray wheel lacks the fake provider's example.yaml (so ray.cluster_utils.AutoscalingCluster fails): the config is
generated here. Runs its own cluster in subprocesses (never the session-wide `ray_session`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO
from helpers.cluster import LocalHead, tagged_pids, wait_for_job
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

# The fake provider always names the head's node type this (FAKE_HEAD_NODE_TYPE in its node_provider.py).
FAKE_HEAD_TYPE = "ray.head.default"
# Scaled-down resources per node type of cluster.yaml: one CPU each (and one fake GPU where the type has GPUs).
MAX_WORKERS_PER_TYPE = 2
IDLE_TIMEOUT_MINUTES = 0.1
OBJECT_STORE_BYTES = 100 * 1024 * 1024
# Autoscaler v2 merges the provider's defaults file into the config, and for `fake_multinode` that file is the
# example.yaml the wheel lacks: name the same provider class as an external provider (defaults built in) instead.
FAKE_PROVIDER_V2 = {
    "type": "external",
    "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
}


def fake_cluster_config(cluster_yaml: Path, gcs_address: str, autoscaler_v2: bool = True) -> dict[str, Any]:
    """cluster.yaml with its provider swapped for fake_multinode and every node type scaled to this machine."""
    source = yaml.safe_load(cluster_yaml.read_text())
    head_type = source["head_node_type"]
    node_types: dict[str, Any] = {}
    for name, spec in source["available_node_types"].items():
        resources = {"CPU": 1}
        if spec.get("resources", {}).get("GPU"):
            resources["GPU"] = 1
        if name == head_type:
            node_types[FAKE_HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        node_types[name] = {
            "resources": {**resources, "object_store_memory": OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": spec.get("min_workers", 0),
            "max_workers": min(spec.get("max_workers", source["max_workers"]), MAX_WORKERS_PER_TYPE),
        }
    return {
        "cluster_name": f"{source['cluster_name']}-fake",
        "max_workers": min(source["max_workers"], MAX_WORKERS_PER_TYPE * (len(node_types) - 1)),
        "upscaling_speed": source.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "provider": {
            **(FAKE_PROVIDER_V2 if autoscaler_v2 else {"type": "fake_multinode"}),
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            **({"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID} if autoscaler_v2 else {}),
        },
        "auth": {},
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_TYPE,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


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


def _alive_nodes(head: LocalHead) -> list[str]:
    result = head.python(
        "import json, ray; ray.init(); print('NODES ' + json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))",
        timeout_s=120,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("NODES ")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("NODES "))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find the cluster's processes")
@pytest.mark.parametrize("autoscaler_v2", [True, False], ids=["autoscaler-v2", "autoscaler-v1"])
def test_autoscaler_adds_workers_for_a_job_and_removes_them_when_idle(autoscaler_v2: bool) -> None:
    """`ray up` runs autoscaler v2 (RAY_UP_enable_autoscaler_v2 defaults to 1); `ray start --autoscaling-config`
    without it runs v1: both must scale cluster.yaml's node types."""
    members = 3  # 3 CPUs held at once; the head has 1, each cpu_worker 1
    v2_env = {
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
    }
    head = LocalHead(num_cpus=1, auth=True, extra_env=v2_env if autoscaler_v2 else {})
    config_path = head.root / "fake-cluster.yaml"
    config = fake_cluster_config(REPO / "cluster.yaml", head.gcs_address, autoscaler_v2)
    config_path.write_text(yaml.safe_dump(config))
    head.autoscaling_config = config_path
    try:
        head.start()
        assert len(_alive_nodes(head)) == 1  # the head alone: min_workers are 0

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
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        assert lines, output[-3000:]
        result = json.loads(lines[-1].removeprefix("RESULT "))
        assert len(result["start_nodes"]) == 1
        assert len(set(result["member_nodes"])) == members  # one actor per node: 2 nodes were added
        assert len(result["alive_nodes"]) >= members
        assert result["cluster_cpus"] >= members
        added = set(result["member_nodes"]) - set(result["start_nodes"])
        # CPU demand brings cpu_worker nodes, not the (scarcer) gpu_worker type.
        assert all(not result["node_resources"][node].get("GPU") for node in added), result["node_resources"]

        # Idle workers go after idle_timeout_minutes.
        deadline = time.monotonic() + 180
        alive = _alive_nodes(head)
        while len(alive) > 1 and time.monotonic() < deadline:
            time.sleep(5)
            alive = _alive_nodes(head)
        assert alive == result["start_nodes"], f"workers not removed: {alive}\n{head.log()}"
    finally:
        head.stop()
    assert tagged_pids(head.tag) == []
