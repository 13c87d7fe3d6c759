"""cluster.yaml's autoscaling on this machine: a `fake_multinode` cluster config derived from cluster.yaml's node
types (provider swapped, every node scaled down to one CPU), and a `LocalHead` that runs the autoscaler on it.
Shared by tests/integration/test_autoscaling.py (worker nodes for a job) and test_serve_autoscaling.py (worker
nodes for Serve replicas).

The ray wheel lacks the fake provider's example.yaml (so ray.cluster_utils.AutoscalingCluster fails): the config is
generated here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

from helpers import REPO
from helpers.cluster import LocalHead

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


def autoscaling_head(autoscaler_v2: bool = True, cluster_yaml: Path = REPO / "cluster.yaml") -> LocalHead:
    """A 1-CPU head (not started yet) whose autoscaler adds and removes cluster.yaml's worker node types.

    `ray up` runs autoscaler v2 (RAY_UP_enable_autoscaler_v2 defaults to 1); `ray start --autoscaling-config`
    without it runs v1."""
    v2_env = {
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
    }
    head = LocalHead(num_cpus=1, auth=True, extra_env=v2_env if autoscaler_v2 else {})
    config_path = head.root / "fake-cluster.yaml"
    config_path.write_text(yaml.safe_dump(fake_cluster_config(cluster_yaml, head.gcs_address, autoscaler_v2)))
    head.autoscaling_config = config_path
    return head


def alive_nodes(head: LocalHead) -> list[str]:
    """Node ids of the live nodes, asked by a driver (a subprocess) of the cluster."""
    result = head.python(
        "import json, ray; ray.init(); print('NODES ' + json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))",
        timeout_s=120,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("NODES ")]
    assert lines, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(lines[-1].removeprefix("NODES "))
