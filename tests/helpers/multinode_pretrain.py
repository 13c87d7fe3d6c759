"""Run by tests/integration/test_train_multinode.py in its own process: a two-node Ray cluster on this machine
(ray.cluster_utils.Cluster), each node with one CPU, so the two training workers must land on different nodes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from result_line import print_result  # this script's folder is first on sys.path

from pipeline.config import load_config
from pipeline.data.build import tokenize_corpus
from pipeline.train.driver import pretrain

REPO = Path(__file__).resolve().parents[2]


def main(root: Path) -> None:
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    shutil.copy(REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt", corpus)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        config = load_config(
            overrides=[
                f"run.dir={root / 'run'}",
                f"data.inputs=[{corpus}]",
                "data.txt_document=paragraph",
                "data.context_length=32",
                "model.preset=nano",
                "train.max_steps=2",
                "train.checkpoint_every=2",
                "train.eval_every=2",
                "train.eval_batches=1",
                "train.micro_batch_size=2",
                "train.max_failures=0",
            ]
        )
        tokenize_corpus(config)
        summary = pretrain(config)
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        print_result({"node_ids": summary["node_ids"], "steps": summary["steps"], "nodes": nodes})
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
