"""``raygpt eval`` from the command line: the shipped tasks at several numbers of shots on an export, scored by
two Ray actors, into <run.dir>/eval (results, lm-eval's output, the shots figure); and a user's mistakes are
clear errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.eval.tasks import TASKS

FORKS: list[int] = []  # pids that forked a child (os.fork, multiprocessing's fork start): exec-only spawns excluded
os.register_at_fork(before=lambda: FORKS.append(os.getpid()))


def test_raygpt_eval_writes_scores_per_shot_and_the_figure(
    tmp_path: Path, exports: dict[str, str], ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The driver forks nothing while it scores: it is a Ray driver, and a child forked from it can hang on a lock
    one of Ray's threads held (lm-eval's bootstrap pool did, waiting on such a child forever)."""
    run_dir = tmp_path / "run"
    args = ["eval", "--export", exports["a"], "--shots", "0,2", "--limit", "6"]
    forks = len(FORKS)
    assert main([*args, "--set", f"run.dir={run_dir}", "--set", "eval.num_workers=2"]) == 0
    assert FORKS[forks:] == []
    out = capsys.readouterr().out
    assert "raygpt eval: 0/2-shot:" in out and "raygpt_speaker acc" in out
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results["shots"] == [0, 2] and results["model"] == "raygpt" and results["source"] == exports["a"]
    assert set(results["scores"]) == set(TASKS)
    for task, per_shot in results["scores"].items():
        assert set(per_shot) == {"0", "2"}, task
    assert results["headline"]["raygpt_speaker"]["metric"] == "acc"
    assert 0 <= results["headline"]["raygpt_speaker"]["by_shots"]["2"] <= 1
    assert results["headline"]["raygpt_ppl"]["metric"] == "bits_per_byte"
    raw = json.loads((run_dir / "eval" / "lm_eval_2shot.json").read_text())
    assert raw["results"]["raygpt_speaker"]["alias"] == "raygpt_speaker"
    assert raw["configs"]["raygpt_speaker"]["num_fewshot"] == 2
    assert isinstance(raw["results"]["raygpt_lambada"]["perplexity_stderr,none"], float)  # bootstrapped in-process
    assert (run_dir / "eval" / "shots.png").read_bytes().startswith(b"\x89PNG")


def test_raygpt_eval_refuses_unknown_tasks_and_files(
    tmp_path: Path, exports: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "--export", exports["a"], "--set", f"run.dir={tmp_path}"]
    assert main([*base, "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err
    assert main([*base, "--tasks", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--shots", "-1"]) == 2
    assert main(["eval", "--export", str(tmp_path / "nothing"), "--set", f"run.dir={tmp_path}"]) == 2
    assert not (tmp_path / "eval").exists()


def test_a_failed_evaluation_leaves_no_scoring_actors(
    tmp_path: Path, exports: dict[str, str], ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """A task file whose data is missing fails inside lm-eval, after the scoring actors started: the error is one
    line, and the actors and their CPUs are gone while the error (and its traceback) is still held."""
    import ray

    from pipeline.config import load_config
    from pipeline.eval.run import evaluate

    task = tmp_path / "broken.yaml"
    task.write_text(
        "task: raygpt_broken\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'missing.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
    )
    settings = ["--set", f"run.dir={tmp_path / 'run'}", "--set", "eval.num_workers=2"]
    assert main(["eval", "--export", exports["a"], "--tasks", str(task), "--shots", "0", *settings]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    config = load_config(None, [f"run.dir={tmp_path / 'run'}", "eval.num_workers=2", f"eval.tasks=[{task}]"])
    with pytest.raises(FileNotFoundError) as held:
        evaluate(config, export=exports["a"])
    total = ray.cluster_resources()["CPU"]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == total
    assert "missing.jsonl" in str(held.value)
