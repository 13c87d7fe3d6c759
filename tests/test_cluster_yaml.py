"""cluster.yaml is a real Ray cluster-launcher file and carries a production-shaped pipeline config."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_cluster(), schema)


def test_schema_check_is_not_vacuous() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    broken = _cluster()
    broken["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}
    try:
        jsonschema.validate(broken, schema)
    except jsonschema.ValidationError:
        return
    raise AssertionError("a fractional node resource should be rejected by Ray's schema")


def test_node_types_scaling_and_setup() -> None:
    cluster = _cluster()
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    gpu = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) > 0]
    cpu = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) == 0]
    assert gpu and cpu
    for spec in workers.values():
        assert 0 <= spec["min_workers"] <= spec["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0
    assert any("pip install" in cmd and "raygpt" in cmd for cmd in cluster["setup_commands"])


def test_dashboard_and_job_api_are_not_public_and_auth_is_on() -> None:
    cluster = _cluster()
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmd in [head, " ".join(cluster["worker_start_ray_commands"])]:
        assert "RAY_AUTH_MODE=token" in cmd
