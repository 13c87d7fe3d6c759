"""Serve replicas autoscale on the engine queue, onto nodes the cluster autoscaler adds: 1 -> 2 -> 1.

A `fake_multinode` cluster from cluster.yaml's node types (tests/helpers/autoscaling.py: a 1-CPU head, 1-CPU
worker nodes started on demand) runs the raygpt application with `serve.autoscaling` min 1, max 2, signal
`engine_queue` and one CPU per Generator replica. Client threads keep more sequences in flight than one replica's
`target_sequences` (and far fewer requests than `target_ongoing_requests`, so only the engine-queue policy can
grow the deployment); the policy asks for a second replica, which fits on no existing node, so the autoscaler adds a
worker node for it. Every request meanwhile answers 200. Once the load stops the deployment shrinks back to one
replica (Serve stops the replica off the head first) and the idle worker node is removed.

Runs its own cluster in subprocesses (never the session-wide `ray_session`). The replica counts over time are
printed (shown on failure).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
from helpers.autoscaling import autoscaling_head
from helpers.cluster import LocalHead, free_ports, tagged_pids
from helpers.result_line import read_result

from pipeline.serve.autoscale import POLICY_PATH

CLIENTS = 6  # concurrent requests: a replica runs at most 4 (max_ongoing_requests), the rest wait at the ingress
TARGET_SEQUENCES = 2  # 6 in flight (4 in the engine, 2 queued at the ingress) ask for 3 replicas, capped at 2
LOOK_BACK_S = 12  # above Serve's 10 s push interval of replica figures (metrics_interval_s), as Serve requires
REQUEST = {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0.8}

DEPLOY = """
import json
from ray import serve
from pipeline.config import load_config
from pipeline.raycluster import connect
from pipeline.serve.deploy import deploy, http_options

config = load_config(overrides=json.loads({overrides!r}))
connect(config.run)
# One HTTP proxy, on the head: every node of this cluster is 127.0.0.1, where only one proxy can hold the port.
serve.start(proxy_location="HeadOnly", http_options=http_options(config))
print("RESULT " + json.dumps({{"url": deploy(config, {export!r})}}), flush=True)  # read by read_result
"""


class Monitor:
    """Samples, every `period_s` from a thread, the Generator's running replicas (id and node) and target, and
    the cluster's live nodes, through the dashboard's REST routes."""

    def __init__(self, head: LocalHead, period_s: float = 1.0) -> None:
        self.head = head
        self.period_s = period_s
        self.started = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.head_node: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def sample(self) -> dict[str, Any]:
        at = round(time.monotonic() - self.started, 1)
        try:
            apps = self.head.get_json("/api/serve/applications/")["applications"]
            deployment = apps["raygpt"]["deployments"]["Generator"] if "raygpt" in apps else None
            nodes = self.head.get_json("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except Exception as exc:  # the dashboard is slow to answer on a busy machine: record it, sample again
            return {"t": at, "error": f"{type(exc).__name__}: {exc}"}
        alive = [n for n in nodes if n["state"] == "ALIVE"]
        self.head_node = next((n["node_id"] for n in alive if n.get("is_head_node")), self.head_node)
        replicas = [] if deployment is None else deployment["replicas"]
        return {
            "t": at,
            "running": {r["replica_id"]: r["node_id"] for r in replicas if r["state"] == "RUNNING"},
            "states": sorted(r["state"] for r in replicas),
            "target": None if deployment is None else deployment["target_num_replicas"],
            "policy": None if deployment is None else deployment["deployment_config"]["autoscaling_config"]["policy"],
            "nodes": sorted(n["node_id"] for n in alive),
            "resources": {n["node_id"]: n.get("resources_total", {}) for n in alive},
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self.period_s)

    def mark(self, event: str) -> None:
        self.samples.append({"t": round(time.monotonic() - self.started, 1), "event": event})

    def latest(self) -> dict[str, Any]:
        return next((s for s in reversed(self.samples) if "running" in s), {})

    def wait(self, predicate: Any, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            latest = self.latest()
            if latest and predicate(latest):
                return latest
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{self.report()}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def report(self) -> str:
        lines = []
        for s in self.samples:
            if "running" not in s:
                lines.append(f"  t={s['t']:6.1f}s  {s.get('error') or '--- ' + s['event']}")
                continue
            where = ", ".join(f"{r[:8]}@{'head' if n == self.head_node else n[:8]}" for r, n in s["running"].items())
            lines.append(
                f"  t={s['t']:6.1f}s  running={len(s['running'])} [{where}] target={s['target']} "
                f"states={s['states']} nodes={len(s['nodes'])}"
            )
        return "replica counts over time:\n" + "\n".join(lines)


class Load:
    """`CLIENTS` threads, each posting one completion after another until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.outcomes: list[tuple[float, int | str, str | None]] = []  # (seconds, status or error, replica)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = session.post(f"{self.url}/v1/completions", json=REQUEST, timeout=150)
                outcome: tuple[float, int | str, str | None] = (
                    time.monotonic() - started,
                    response.status_code,
                    response.headers.get("x-raygpt-replica"),
                )
            except requests.RequestException as exc:
                outcome = (time.monotonic() - started, f"{type(exc).__name__}: {exc}", None)
            with self._lock:
                self.outcomes.append(outcome)

    def answered_by(self) -> Counter[str | None]:
        with self._lock:
            return Counter(replica for _, status, replica in self.outcomes if status == 200)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)


def test_generator_scales_out_onto_an_added_node_under_load_and_back_when_idle(
    exports: dict[str, str], tmp_path: Path
) -> None:
    head = autoscaling_head()
    (port,) = free_ports(1)
    overrides = [
        f"run.dir={tmp_path}",
        "serve.host=127.0.0.1",
        f"serve.port={port}",
        "serve.request_timeout_s=120",
        "serve.num_cpus_per_replica=1",
        "serve.max_ongoing_requests=4",
        "serve.max_batch_size=4",
        "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=2",
        "serve.autoscaling.signal=engine_queue",
        f"serve.autoscaling.target_sequences={TARGET_SEQUENCES}",
        # Out of reach for 6 requests: were Serve's default policy in charge, the deployment would never grow.
        "serve.autoscaling.target_ongoing_requests=100",
        f"serve.autoscaling.look_back_period_s={LOOK_BACK_S}",
        "serve.autoscaling.upscale_delay_s=1",
        "serve.autoscaling.downscale_delay_s=3",
    ]
    monitor: Monitor | None = None
    load: Load | None = None
    figures: dict[str, Any] = {}
    began = time.monotonic()
    try:
        head.start()
        figures["head_up_s"] = round(time.monotonic() - began, 1)
        deployed = head.python(DEPLOY.format(overrides=json.dumps(overrides), export=exports["a"]), timeout_s=240)
        figures["deployed_s"] = round(time.monotonic() - began, 1)
        result = read_result(deployed.stdout)  # Ray's log lines can share its line
        assert deployed.returncode == 0 and result, deployed.stdout[-3000:] + deployed.stderr[-6000:] + head.log()
        monitor = Monitor(head)
        first = monitor.wait(lambda s: len(s["running"]) == 1, 60, "the first replica")
        assert len(first["nodes"]) == 1, first  # the head alone: min_workers are 0
        assert first["policy"]["policy_function"] == POLICY_PATH, first["policy"]
        start_nodes = set(first["nodes"])
        (first_replica,) = first["running"]

        load = Load(result["url"], CLIENTS)
        loaded_at = time.monotonic()
        monitor.mark(f"load started: {CLIENTS} clients")
        grown = monitor.wait(lambda s: len(s["running"]) == 2, 180, "a second replica under load")
        figures["scale_up_s"] = round(time.monotonic() - loaded_at, 1)
        (second_replica,) = set(grown["running"]) - {first_replica}
        new_node = grown["running"][second_replica]
        assert new_node not in start_nodes and new_node in grown["nodes"], (grown, start_nodes)
        assert grown["running"][first_replica] in start_nodes
        # CPU demand brings a cpu_worker node, not the (scarcer) gpu_worker type.
        assert not grown["resources"].get(new_node, {}).get("GPU"), grown["resources"]
        # The new replica takes requests while the load goes on.
        deadline = time.monotonic() + 60
        while load.answered_by()[second_replica] < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        load.stop()
        idle_at = time.monotonic()
        monitor.mark("load stopped")
        outcomes = load.outcomes
        figures["requests_sent"] = len(outcomes)
        figures["requests_ok"] = sum(status == 200 for _, status, _ in outcomes)
        figures["answered_by"] = dict(load.answered_by())
        failed = [outcome for outcome in outcomes if outcome[1] != 200]
        assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {failed[:10]}"
        assert load.answered_by()[second_replica] >= 3, figures["answered_by"]

        shrunk = monitor.wait(
            lambda s: len(s["running"]) == 1 and s["target"] == 1 and s["states"] == ["RUNNING"],
            120,
            "the deployment to shrink back to one replica",
        )
        figures["scale_down_s"] = round(time.monotonic() - idle_at, 1)
        assert list(shrunk["running"].values()) == [grown["running"][first_replica]], shrunk  # on the head
        monitor.wait(lambda s: new_node not in s["nodes"], 120, "the idle worker node's removal")
        figures["node_removed_s"] = round(time.monotonic() - idle_at, 1)
    finally:
        if load is not None:
            load.stop()
        if monitor is not None:
            monitor.stop()
            print(monitor.report())
        stopping = time.monotonic()
        head.stop()
        figures["teardown_s"] = round(time.monotonic() - stopping, 1)
        print(f"serve autoscaling: {figures}")
    assert tagged_pids(head.tag) == []
