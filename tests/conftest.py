"""Shared fixtures: one local Ray instance for every test that needs Ray (starting Ray costs seconds), one Serve
HTTP proxy on a free loopback port, nano exports for the Serve tests, and an S3-protocol server on loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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

# Object storage for the whole session is the S3-protocol server of the ``s3`` fixture, reached the standard way
# (AWS_ENDPOINT_URL and credentials, honoured by pyarrow, Ray and boto3). Set before any Ray starts, so that its
# workers inherit it; never a real AWS account. The export cache lives in the session's temp dir.
S3_PORT = free_ports(1)[0]
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
    RAYGPT_CACHE_DIR=tempfile.mkdtemp(prefix="raygpt-test-cache-"),
)
atexit.register(shutil.rmtree, os.environ["RAYGPT_CACHE_DIR"], True)
# Hugging Face's caches (datasets built from the eval tasks' files, hub lookups) and matplotlib's font cache live
# in the session's temp dir too: a test never depends on, locks or fills the machine's home directory.
for variable, prefix in (("HF_HOME", "raygpt-test-hf-"), ("MPLCONFIGDIR", "raygpt-test-mpl-")):
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[variable], True)


def pytest_report_header() -> str:
    """What a CI log needs to explain a slow or stuck run: cores, memory, and free space where tests write."""
    free = {path: shutil.disk_usage(path).free / 2**30 for path in (tempfile.gettempdir(), os.getcwd())}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    disks = ", ".join(f"{path} {gib:.1f} GiB free" for path, gib in free.items())
    return f"machine: {os.cpu_count()} cores, {memory:.1f} GiB memory; {disks}"


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
    """A small model with a long context: requests that run for seconds (2,000 tokens took 7.7 s on one core of the
    2-core CI machine). A smaller one finished a 2,000-token request inside a 1 s timeout once the replica stepped
    its engine back to back."""
    cfg = GPTConfig(vocab_size=NANO.vocab_size, context_length=2048, n_layer=2, n_head=2, d_model=128)
    torch.manual_seed(0)
    return save_export(GPT(cfg), cfg, tmp_path_factory.mktemp("long") / "export", get_tokenizer().info())


@pytest.fixture(scope="session")
def s3() -> Iterator[str]:
    """A moto S3 server on loopback (its own process) with one empty bucket; yields ``s3://<bucket>``."""
    import pyarrow.fs as pafs

    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the S3 test server did not start") from None
                time.sleep(0.2)
        fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        fs.create_dir("raygpt-test")
        yield "s3://raygpt-test"
    finally:
        server.terminate()
        server.wait(timeout=30)
