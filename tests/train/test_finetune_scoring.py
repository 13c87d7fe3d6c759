"""Fine-tuning's held-out scoring through the driver, for real (Ray Train + DeepSpeed, 2 CPU workers, nano model):
the export is written before any scoring, a rerun after a scoring failure only scores, a held-out prompt longer
than the context is scored, and scoring loads the tokenizer the data stage used (``data.tokenizer_file``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.ray_state import live_actors

from pipeline.config import PipelineConfig, load_config
from pipeline.layout import RunLayout, is_complete_export
from pipeline.model import tokenizer as tokenizer_module

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "finetune"
LONG_PROMPT = "Play: Hamlet\nLine: " + "To be, or not to be, that is the question; " * 30 + "\nSpeaker:"
HELDOUT = 6  # sample held-out examples, plus the long one


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ft-scoring")
    train = SAMPLE.joinpath("train.jsonl").read_text().splitlines()[:32]
    heldout = SAMPLE.joinpath("heldout.jsonl").read_text().splitlines()[:HELDOUT]
    heldout.append(json.dumps({"prompt": LONG_PROMPT, "completion": " Hamlet"}))
    (root / "train.jsonl").write_text("\n".join(train) + "\n")
    (root / "heldout.jsonl").write_text("\n".join(heldout) + "\n")
    return root


def _config(run_dir: Path, inputs: Path, init_from: str, *extra: str) -> PipelineConfig:
    return load_config(
        overrides=[
            f"run.dir={run_dir}",
            "data.context_length=32",
            "model.preset=nano",
            f"finetune.init_from={init_from}",
            f"finetune.inputs=[{inputs / 'train.jsonl'}]",
            f"finetune.eval_inputs=[{inputs / 'heldout.jsonl'}]",
            "finetune.max_steps=2",
            "finetune.micro_batch_size=2",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "train.warmup_steps=1",
            "train.max_failures=0",
            *extra,
        ]
    )


def _train_workers() -> set[str]:
    return {a["ActorID"] for a in live_actors("RayTrainWorker", state=None)}


def test_export_is_written_before_scoring_and_a_rerun_only_scores(
    tmp_path: Path, inputs: Path, exports: dict[str, str], ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.data.finetune import tokenize_finetune
    from pipeline.export.format import read_export_info
    from pipeline.train import evaluate
    from pipeline.train.driver import finetune

    config = _config(tmp_path / "run", inputs, exports["a"])
    tokenize_finetune(config)

    def failing_scorer(*_args: object, **_kwargs: object) -> dict:
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(evaluate, "exact_match", failing_scorer)
    with pytest.raises(RuntimeError, match="scoring failed"):
        finetune(config)
    target = RunLayout.of(config).stage_export("finetune")
    assert is_complete_export(target), "the trained model must be exported before it is scored"
    assert read_export_info(target)[0].metadata["steps"] == 2

    monkeypatch.undo()
    workers = _train_workers()
    summary = finetune(config)
    assert _train_workers() == workers, "a rerun after training finished must not train again"
    assert summary["steps"] == 2 and summary["export"] == target
    before, after = summary["exact_match_before"], summary["exact_match_after"]
    assert before["n"] == after["n"] == HELDOUT + 1  # the long prompt is scored too
    assert finetune(config)["cached"]


def test_scoring_uses_the_data_tokenizer_file(
    tmp_path: Path, inputs: Path, exports: dict[str, str], ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoding that is not shipped is found only through ``data.tokenizer_file``: here r50k_base, with the
    shipped copy out of reach of this (the driver's) process."""
    from pipeline.data.finetune import tokenize_finetune
    from pipeline.train.driver import finetune

    own = tmp_path / "tokenizers" / "r50k_base.tiktoken"
    own.parent.mkdir()
    shutil.copy(tokenizer_module.ASSETS_DIR / "r50k_base.tiktoken", own)
    monkeypatch.setattr(tokenizer_module, "ASSETS_DIR", tmp_path / "nothing-shipped")
    monkeypatch.delenv(tokenizer_module.TOKENIZER_DIR_ENV, raising=False)
    tokenizer_module.clear_cache()
    try:
        with pytest.raises(tokenizer_module.TokenizerError, match="not found"):
            tokenizer_module.get_tokenizer()
        config = _config(tmp_path / "run", inputs, exports["a"], f"data.tokenizer_file={own}")
        tokenize_finetune(config)
        summary = finetune(config)
        assert summary["exact_match_before"]["n"] == summary["exact_match_after"]["n"] == HELDOUT + 1
    finally:
        monkeypatch.undo()
        tokenizer_module.clear_cache()
