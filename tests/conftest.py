"""Shared fixtures: one local Ray instance for every test that needs Ray (starting Ray costs seconds), one Serve
HTTP proxy on a free loopback port, and nano exports for the Serve tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from helpers.cluster import free_ports

from pipeline.export.format import save_export
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.presets import PRESETS
from pipeline.model.tokenizer import get_tokenizer

NANO = PRESETS["nano"].model  # context 64

# Keep test runs quiet and offline-friendly.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray shared by the whole session: 4 logical CPUs on this 2-core machine, so that two Serve
    replicas or two training workers fit beside Ray Data tasks."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session: None) -> Iterator[int]:
    from ray import serve

    (port,) = free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("exports")
    tokenizer = get_tokenizer()
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        out[name] = save_export(GPT(NANO), NANO, root / name, tokenizer.info(), metadata={"stage": "test"})
    return out


@pytest.fixture(scope="session")
def long_export(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer model with a long context: requests that run for seconds."""
    cfg = GPTConfig(vocab_size=NANO.vocab_size, context_length=2048, n_layer=1, n_head=1, d_model=16)
    torch.manual_seed(0)
    return save_export(GPT(cfg), cfg, tmp_path_factory.mktemp("long") / "export", get_tokenizer().info())
