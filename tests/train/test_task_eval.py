"""``train.eval_tasks``: lm-eval tasks scored inside a real Ray Train + DeepSpeed ZeRO-3 run (2 CPU workers, nano
model), the scoring split over both ranks, at every validation evaluation. The scores of the last evaluation are
those ``raygpt eval`` gives on the export of the same weights; a task that generates text is refused before any
worker starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.settings import nano_pretrain

from pipeline.config import load_config
from pipeline.eval.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
LIMIT = 10


def test_in_training_task_scores_equal_raygpt_eval_on_the_export(tmp_path: Path, ray_session: None) -> None:
    from pipeline.data.build import tokenize_corpus
    from pipeline.eval.run import evaluate
    from pipeline.train.driver import pretrain

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(REPO / "data" / "sample" / "shakespeare" / "macbeth_gut.txt", corpus)
    run = tmp_path / "run"
    tasks = sorted(TASKS)
    config = load_config(
        overrides=nano_pretrain(
            run,
            corpus,
            "data.num_tokenizers=1",
            "train.max_steps=4",
            "train.checkpoint_every=4",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.max_failures=0",
            f"train.eval_tasks=[{','.join(tasks)}]",
            f"train.eval_task_limit={LIMIT}",
            "eval.shots=[0]",
            f"eval.limit={LIMIT}",
            "eval.num_workers=1",
        )
    )
    tokenize_corpus(config, log=lambda _: None)
    summary = pretrain(config)

    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    scored = {row["step"]: row for row in rows if "lm_eval/raygpt_speaker/acc" in row}
    assert sorted(scored) == [2, 4]
    for key in ("lm_eval/raygpt_speaker/acc", "lm_eval/raygpt_lambada/acc", "lm_eval/raygpt_ppl/bits_per_byte"):
        assert all(key in row for row in scored.values()), key
    assert scored[2]["lm_eval/raygpt_ppl/bits_per_byte"] != scored[4]["lm_eval/raygpt_ppl/bits_per_byte"]
    assert summary["tasks"] == {k: v for k, v in scored[4].items() if k.startswith("lm_eval/")}

    # the export holds the weights evaluated at step 4: raygpt eval (one process, no ZeRO) scores them alike
    config.eval.tasks = tasks
    after = evaluate(config, export=summary["export"])["scores"]
    for task in tasks:
        for metric, value in after[task]["0"].items():
            trained = scored[4][f"lm_eval/{task}/{metric.split(',')[0]}"]
            assert trained == pytest.approx(value, rel=1e-4, abs=1e-6), (task, metric)


def test_tasks_that_generate_or_do_not_exist_are_refused(tmp_path: Path) -> None:
    from pipeline.train.task_eval import check_tasks

    check_tasks(sorted(TASKS))
    generating = tmp_path / "generate.yaml"
    generating.write_text(
        "task: raygpt_generating\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{text}}'\ndoc_to_target: ''\n"
    )
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="raygpt_generating is a generate_until task"):
        check_tasks([str(generating)])
    with pytest.raises(ValueError, match="train.eval_tasks: unknown lm-eval task"):
        check_tasks(["no_such_task"])
