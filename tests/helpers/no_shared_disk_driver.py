"""Run by tests/integration/test_no_shared_disk.py as the driver of a two-node cluster whose worker node cannot see
this process's working directory: tokenize and pretrain with everything on S3, kill the training worker on the
other node once a checkpoint is registered, then serve two replicas (one per node). Prints one line: RESULT and a
JSON object.

Arguments: the run's S3 prefix, the Serve HTTP port.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

import ray
import requests
from ray import serve
from ray_state import live_actors, wait_until  # this script's folder is first on sys.path
from result_line import print_result

from pipeline import storage
from pipeline.config import load_config
from pipeline.data.build import tokenize_corpus
from pipeline.layout import RunLayout
from pipeline.raycluster import connect
from pipeline.serve.deploy import APP_NAME, deploy
from pipeline.train.driver import pretrain

STEPS, EVERY = 6, 2


def main(prefix: str, port: int) -> dict[str, Any]:
    config = load_config(
        overrides=[
            f"run.ray_address={os.environ['RAY_ADDRESS']}",
            f"run.dir={prefix}/run",
            f"data.inputs=[{prefix}/corpus/]",
            "data.context_length=32",
            "data.num_tokenizers=1",
            "model.preset=nano",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            f"train.max_steps={STEPS}",
            f"train.checkpoint_every={EVERY}",
            f"train.eval_every={EVERY}",
            "train.eval_batches=1",
            "train.micro_batch_size=4",
            "train.warmup_steps=2",
            "train.max_failures=1",
            "serve.num_replicas=2",
            "serve.num_cpus_per_replica=1",
            f"serve.port={port}",
            "serve.request_timeout_s=120",
        ]
    )
    connect(config.run)  # as every stage joins: workers' output stays in Ray's logs, off this stdout
    here = ray.get_runtime_context().get_node_id()
    other = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    assert len(other) == 1, ray.nodes()
    layout = RunLayout.of(config)
    tokenize_corpus(config, log=lambda _: None)

    snapshot = storage.join(layout.experiment("pretrain"), "checkpoint_manager_snapshot.json")

    def registered() -> int:
        try:
            latest = json.loads(storage.read_bytes(snapshot)).get("latest_checkpoint_result")
        except (OSError, ValueError):
            return 0
        return int(latest["metrics"]["step"]) if latest else 0

    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            outcome["summary"] = pretrain(config)
        except BaseException as exc:
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    workers = wait_until(
        lambda: len(found := live_actors("RayTrainWorker")) == 2 and found,
        300,
        "2 training workers",
    )
    victim = next(w for w in workers if w["Address"]["NodeID"] == other[0])
    wait_until(lambda: 0 < registered() < STEPS or not thread.is_alive(), 300, "a registered checkpoint", poll=0.05)
    resumable = registered()
    os.kill(int(victim["Pid"]), signal.SIGKILL)
    thread.join(timeout=600)
    summary = outcome.get("summary") or {}

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    url = deploy(config)
    replicas: set[str] = set()
    deadline = time.monotonic() + 120
    while len(replicas) < 2 and time.monotonic() < deadline:
        response = requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2}, timeout=60)
        response.raise_for_status()
        replicas.add(response.headers["x-raygpt-replica"])
    replica_nodes = sorted(a["Address"]["NodeID"] for a in live_actors("ServeReplica:raygpt:Generator"))
    serve.delete(APP_NAME)
    metrics = storage.read_bytes(layout.metrics_file("pretrain")).decode() if summary else ""
    return {
        "error": outcome.get("error"),
        "steps": summary.get("steps"),
        "train_nodes": sorted(set(summary.get("node_ids") or [])),
        "nodes": sorted([here, other[0]]),
        "worker_node": other[0],
        "killed_on": victim["Address"]["NodeID"],
        "resumable": resumable,
        "workers_started": len(live_actors("RayTrainWorker", state=None)),
        "metric_steps": [json.loads(line)["step"] for line in metrics.splitlines()],
        "export": summary.get("export"),
        "replicas_answering": len(replicas),
        "replica_nodes": replica_nodes,
    }


if __name__ == "__main__":
    print_result(main(sys.argv[1], int(sys.argv[2])))
