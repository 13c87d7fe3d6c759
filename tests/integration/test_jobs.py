"""`ray job submit --working-dir . -- python jobs/run.py ...` against a real head started with `ray start --head`
(free loopback ports, token authentication on): the job runs the whole pipeline on a tiny config, leaves the
endpoint up after it ends, and `jobs/serve.py --stop` removes it.

Runs its own cluster in subprocesses (never the session-wide `ray_session`); slow on 2 cores (minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import ray._private.utils as ray_utils
from helpers import REPO
from helpers.cluster import LocalHead, free_ports, tagged_pids, wait_for_job
from helpers.settings import tiny_run

JOB_TIMEOUT_S = 900
EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "bench"]


def _workspace(root: Path) -> tuple[Path, Path]:
    corpus, finetune = root / "corpus", root / "ft"
    corpus.mkdir()
    finetune.mkdir()
    shutil.copy(REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt", corpus)
    for name, count in (("train.jsonl", 48), ("heldout.jsonl", 8)):
        lines = (REPO / "data" / "sample" / "finetune" / name).read_text().splitlines()[:count]
        (finetune / name).write_text("\n".join(lines) + "\n")
    return corpus, finetune


def _tiny_overrides(root: Path, corpus: Path, finetune: Path, serve_port: int) -> list[str]:
    train, heldout = finetune / "train.jsonl", finetune / "heldout.jsonl"
    settings = tiny_run(str(root / "run"), "jobtest", str(corpus), str(train), str(heldout), serve_port)
    settings += ["eval.tasks=[raygpt_speaker]", "eval.shots=[0, 1]", "eval.limit=4"]  # the run's eval row
    return [arg for setting in settings for arg in ("--set", setting)]


def _submit(head: LocalHead, entrypoint: list[str]) -> str:
    submission_id = f"raygpt-test-{uuid.uuid4().hex[:8]}"
    result = head.ray(
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--submission-id",
        submission_id,
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps({"excludes": EXCLUDES}),
        "--no-wait",
        "--",
        *entrypoint,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return submission_id


def _get(url: str, key: str | None = None) -> int | None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc to find the cluster's processes")
def test_job_submit_runs_the_pipeline_on_a_token_authenticated_head(tmp_path: Path) -> None:
    corpus, finetune = _workspace(tmp_path)
    (serve_port,) = free_ports(1)
    # The documented way to give serving jobs the API key: RAYGPT_API_KEY in the environment of the head's
    # `ray start` (cluster.yaml reads it from a file); a job's runtime_env env_vars would land in Ray's logs.
    api_key = f"sk-raygpt-{uuid.uuid4().hex}"
    head = LocalHead(num_cpus=2, auth=True, extra_env={"RAYGPT_API_KEY": api_key})
    try:
        head.start()
        # Invisible to the rest of the suite: not in this process's RAY_ADDRESS, and not the "latest cluster" that
        # a plain ray.init() on this machine would join (its address file is under its own --temp-dir).
        assert os.environ.get("RAY_ADDRESS") != head.gcs_address
        assert ray_utils.read_ray_address() != head.gcs_address

        # Token authentication is on: the job API refuses a client without the token.
        assert head.http_status("/api/jobs/", token=False) == 401
        anonymous = head.ray("job", "list", "--address", head.dashboard_url, with_token=False)
        assert anonymous.returncode != 0, anonymous.stdout
        assert head.http_status("/api/jobs/") == 200

        submission_id = _submit(
            head, ["python", "jobs/run.py", *_tiny_overrides(tmp_path, corpus, finetune, serve_port)]
        )
        status, logs = wait_for_job(head, submission_id, JOB_TIMEOUT_S, poll_s=3)
        assert status == "SUCCEEDED", f"job {submission_id} ended {status}:\n{logs[-6000:]}\n{head.log()}"
        assert "raygpt run summary" in logs
        # the console a person reads: stage lines, the driver's progress lines, the summary naming Ray's logs;
        # no worker output (Ray Train's controller, DeepSpeed, tqdm from the ranks) and no Ray Data progress log
        console = logs.splitlines()
        assert len(console) < 80, "\n".join(console)
        assert any(line.startswith("pretrain step 3/3 (100%)") for line in console), logs
        assert any(line.startswith("finetune step 2/2 (100%)") for line in console), logs
        assert not [line for line in console if line.startswith("(") or "logging_progress" in line], logs
        assert any(line.strip().startswith("logs ") and "/logs" in line for line in console), logs

        run_dir = tmp_path / "run"
        manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
        assert manifest["splits"]["train"]["sequences"] > 0
        for stage in ("pretrained", "finetuned"):
            export = run_dir / "export" / stage
            assert (export / "model.safetensors").is_file() and (export / "config.json").is_file(), stage
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["pretrain"]["steps"] == 3
        assert summary["finetune"]["steps"] == 2
        assert isinstance(summary["serve"]["sample_completion"], str)
        assert "raygpt_speaker acc" in summary["eval"]["line"] and "eval" in summary["seconds"]
        scores = json.loads((run_dir / "eval" / "results.json").read_text())
        assert set(scores["scores"]["raygpt_speaker"]) == {"0", "1"}
        assert summary["serve"]["url"] == f"http://127.0.0.1:{serve_port}"

        # The job has ended; the endpoint it deployed stays up on the cluster, and the key reached it ...
        assert _get(f"http://127.0.0.1:{serve_port}/v1/models") == 401
        assert _get(f"http://127.0.0.1:{serve_port}/v1/models", api_key) == 200
        # ... until a second job removes it.
        stop_id = _submit(
            head, ["python", "jobs/serve.py", "--stop", *_tiny_overrides(tmp_path, corpus, finetune, serve_port)]
        )
        status, logs = wait_for_job(head, stop_id, 300, poll_s=3)
        assert status == "SUCCEEDED", f"job {stop_id} ended {status}:\n{logs[-4000:]}"
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{serve_port}/health") == 200 and time.monotonic() < deadline:
            time.sleep(1)
        assert _get(f"http://127.0.0.1:{serve_port}/health") != 200

        # The token authenticates every call above, yet no log holds it: not the jobs' logs, nor any file the
        # head's processes wrote (session logs, job logs, runtime envs), only the token file itself.
        assert head.token not in logs and api_key not in logs
        for secret in (head.token.encode(), api_key.encode()):
            files = [p for p in head.root.rglob("*") if p.is_file() and p != head.token_path]
            leaked = [p for p in files if secret in p.read_bytes()]
            assert leaked == [], f"a secret was written to {leaked}"
    finally:
        head.stop()
    assert tagged_pids(head.tag) == []


def test_job_entrypoints_reject_bad_config_before_touching_ray(tmp_path: Path) -> None:
    """Each entrypoint parses --config/--set like the CLI and exits non-zero with the CLI's message."""
    for script in ("tokenize_data", "pretrain", "finetune", "serve", "run"):
        result = subprocess.run(
            [sys.executable, str(REPO / "jobs" / f"{script}.py"), "--set", "train.max_steps=abc"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert result.returncode == 2, (script, result.stdout, result.stderr)
        assert "train.max_steps: expected an integer, got 'abc'" in result.stderr, (script, result.stderr)
