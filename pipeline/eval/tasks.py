"""The evaluation tasks raygpt ships, as lm-eval task configs over the data files in ``pipeline/eval/data``.

The data come from the sample corpus's validation split only (``data/sample/make_eval_tasks.py`` builds them and
says how). lm-eval reads a task's ``data_files`` relative to the working directory, so the configs are written out
with absolute paths by :func:`write_task_dir`, whose folder is lm-eval's ``include_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DATA_DIR = Path(__file__).resolve().parent / "data"

TASKS: dict[str, dict[str, Any]] = {
    # LAMBADA-style: the last word of a held-out speech; acc = the greedy continuation is that word
    "raygpt_lambada": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": " {{target}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    # which of the play's four most frequent speakers says the line
    "raygpt_speaker": {
        "output_type": "multiple_choice",
        "doc_to_text": "Play: {{play}}\nLine: {{line}}\nSpeaker:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    },
    # rolling perplexity of held-out speeches
    "raygpt_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
    },
}


def task_config(name: str) -> dict[str, Any]:
    """The full lm-eval config of a shipped task (its data file by absolute path)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(DATA_DIR / f"{name}.jsonl")}},
        "test_split": "test",
        **TASKS[name],
        "metadata": {"version": 1.0},
    }


def write_task_dir(directory: str | Path) -> Path:
    """Write every shipped task's YAML into ``directory`` (lm-eval's ``include_path``); returns it."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name), sort_keys=False))
    return folder
