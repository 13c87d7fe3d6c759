"""The endpoint's life on a shared Ray cluster: stopping raygpt removes only raygpt's application, deploying onto a
Serve instance bound elsewhere is refused rather than printing a URL that does not answer, and Ctrl-C on
``raygpt serve`` in a terminal stops everything it started, its local Ray included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
from helpers.cluster import free_ports, tagged_pids
from helpers.serve import raygpt_serve, serve_config
from ray import serve

from pipeline.config import ConfigError
from pipeline.serve.deploy import APP_NAME, deploy, shutdown


@serve.deployment
class Other:
    """Somebody else's application on the same cluster."""

    def __call__(self, _request: object) -> str:
        return "still here"


def test_stopping_raygpt_leaves_other_applications_running(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    serve.run(Other.bind(), name="someone-else", route_prefix="/else", blocking=False)
    try:
        url = deploy(serve_config(tmp_path, serve_port), exports["a"])
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        shutdown()  # what `raygpt serve --stop` and Ctrl-C call
        applications = serve.status().applications
        assert APP_NAME not in applications
        assert applications["someone-else"].status == "RUNNING"
        assert requests.get(f"{url}/else", timeout=30).text == "still here"
        shutdown()  # safe to call again
    finally:
        serve.delete("someone-else")


def test_deploying_onto_serve_bound_elsewhere_is_refused(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    (other_port,) = free_ports(1)
    with pytest.raises(ConfigError) as refused:
        deploy(serve_config(tmp_path, other_port), exports["a"])
    message = str(refused.value)
    assert f"127.0.0.1:{serve_port}" in message and "serve.port" in message
    assert APP_NAME not in serve.status().applications
    with pytest.raises(ConfigError):
        deploy(serve_config(tmp_path, serve_port, host="127.0.0.2"), exports["a"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the processes it started through /proc")
def test_ctrl_c_stops_the_endpoint_and_the_local_ray_it_started(tmp_path: Path, exports: dict[str, str]) -> None:
    (port,) = free_ports(1)
    with raygpt_serve(tmp_path, ["--set", f"serve.port={port}", "--export", exports["a"]]) as served:
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        assert len(tagged_pids(served.tag)) > 3  # the driver, and the local Ray's processes
        assert "endpoint stopped" in served.ctrl_c(timeout_s=120)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
