"""An exception inside a replica's engine fails every request it was running at once, with a 503 in OpenAI's shape
(an error event on a stream), and the same replica serves the next request; should the generation loop itself die,
its requests fail the same way and Serve replaces the replica."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import requests
from helpers.serve import deployed, expect_error
from ray import serve

from pipeline.serve.deploy import APP_NAME


def _generator_replicas() -> list[Any]:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"{APP_NAME}#Generator#" in a["name"]]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def _arm_failure(replica: Any) -> None:
    """Inside the replica's process: the model's next forward pass raises (once), as a CUDA or kernel error would,
    in the middle of a step that has already taken the waiting sequences from the queue."""

    def arm(actor: Any) -> None:
        model = actor._replica_impl._user_callable_wrapper.user_callable.engine.model

        def failing_forward(*_args: Any, **_kwargs: Any) -> Any:
            del model.forward
            raise RuntimeError("injected engine failure")

        model.forward = failing_forward

    ray.get(replica.__ray_call__.remote(arm))


def test_an_engine_exception_fails_its_requests_fast_and_the_replica_goes_on(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    with deployed(tmp_path, serve_port, exports["a"], batch_wait_timeout_s=0.5, max_batch_size=4) as url:
        (replica,) = _generator_replicas()
        body = {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}
        assert requests.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        _arm_failure(replica)

        def plain(_: int) -> requests.Response:
            return requests.post(f"{url}/v1/completions", json=body, timeout=60)

        def streamed(_: int) -> list[str]:
            with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                assert r.status_code == 200
                return [line for line in r.iter_lines(decode_unicode=True) if line]

        # Sent together: the replica waits batch_wait_timeout_s, so all of them are in the failing step.
        with ThreadPoolExecutor(4) as pool:
            plain_futures = [pool.submit(plain, i) for i in range(3)]
            stream_future = pool.submit(streamed, 0)
            plain_results = [f.result() for f in plain_futures]
            stream_lines = stream_future.result()
        for r in plain_results:
            error = expect_error(r, 503, "engine_failure")
            assert error["type"] == "server_error" and "injected" not in error["message"]  # no internals
        assert any('"code": "engine_failure"' in line for line in stream_lines), stream_lines
        assert stream_lines[-1] == "data: [DONE]"

        # The same replica serves the next requests, and holds nothing of the failed ones.
        again = requests.post(f"{url}/v1/completions", json=body, timeout=30)
        assert again.status_code == 200 and again.json()["choices"][0]["text"]
        assert [r._actor_id for r in _generator_replicas()] == [replica._actor_id]  # not a replacement
        stats = serve.get_deployment_handle("Generator", APP_NAME).stats
        assert stats.remote().result() == {"running": 0, "waiting": 0, "attached": 0}


def _kill_loop(replica: Any) -> None:
    """Inside the replica's process: the generation loop's own code (not a model step) raises the next time it
    wakes, so the loop thread ends with requests attached."""

    def arm(actor: Any) -> None:
        engine = actor._replica_impl._user_callable_wrapper.user_callable.engine

        def failing_has_work() -> bool:
            raise RuntimeError("injected loop failure")

        engine.has_work = failing_has_work

    ray.get(replica.__ray_call__.remote(arm))


def test_a_dead_generation_loop_fails_its_requests_and_serve_replaces_the_replica(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    with deployed(tmp_path, serve_port, exports["a"], max_batch_size=4) as url:
        (replica,) = _generator_replicas()
        body = {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}
        assert requests.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        _kill_loop(replica)

        with ThreadPoolExecutor(3) as pool:  # would wait for the 60 s timeout if nobody told them
            results = list(pool.map(lambda _: requests.post(f"{url}/v1/completions", json=body, timeout=60), range(3)))
        for r in results:
            expect_error(r, 503, "engine_failure")
        # a request that comes after the loop died fails fast the same way, plain and streamed
        expect_error(requests.post(f"{url}/v1/completions", json=body, timeout=60), 503, "engine_failure")
        with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=60) as r:
            expect_error(r, 503, "engine_failure")

        # The health check reports the dead loop; Serve starts a replacement, which serves.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            current = _generator_replicas()
            if current and current[0]._actor_id != replica._actor_id:
                r = requests.post(f"{url}/v1/completions", json=body, timeout=30)
                if r.status_code == 200:
                    break
            time.sleep(1)
        else:
            raise AssertionError("Serve did not replace the replica whose generation loop died")
        assert r.json()["choices"][0]["text"]
