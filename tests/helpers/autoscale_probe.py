"""Run as a Ray job by tests/integration/test_autoscaling.py: holds more CPUs at once than the head has (one
1-CPU actor per member of a gang, like Ray Train's workers), so the autoscaler must add worker nodes; prints where
they ran."""

from __future__ import annotations

import sys
import time

import ray
from result_line import print_result  # this script's folder is first on sys.path


@ray.remote(num_cpus=1)
class Member:
    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def main(members: int, timeout_s: float) -> None:
    ray.init()  # RAY_ADDRESS, set by the job system
    start_nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    started = time.monotonic()
    gang = [Member.remote() for _ in range(members)]
    node_ids = ray.get([member.node.remote() for member in gang], timeout=timeout_s)
    resources = ray.cluster_resources()
    result = {
        "start_nodes": start_nodes,
        "member_nodes": node_ids,
        "alive_nodes": [node["NodeID"] for node in ray.nodes() if node["Alive"]],
        "node_resources": {node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]},
        "cluster_cpus": resources.get("CPU", 0),
        "seconds": round(time.monotonic() - started, 1),
    }
    for member in gang:
        ray.kill(member)
    print_result(result)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
