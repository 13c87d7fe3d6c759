"""The Train stage for real: Ray Train + DeepSpeed ZeRO-3 with 2 CPU workers on a small corpus.

Kept few and small (nano model, 32-token sequences, a handful of steps): each fit costs ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.settings import nano_pretrain

from pipeline.config import PipelineConfig, load_config
from pipeline.export.format import load_export

REPO = Path(__file__).resolve().parents[2]
PLAYS = ["macbeth_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt"]


def _config(run_dir: Path, *extra: str) -> PipelineConfig:
    corpus = run_dir.parent / "corpus"
    return load_config(
        overrides=nano_pretrain(
            run_dir,
            corpus,
            "train.max_steps=6",
            "train.checkpoint_every=3",
            "train.eval_every=3",
            "train.eval_batches=2",
            "train.max_failures=0",
            "train.loss_chunk_rows=48",  # 128 positions a micro-batch: three chunks, the last one short
            "finetune.max_steps=3",
            "finetune.micro_batch_size=4",
            f"finetune.inputs=[{run_dir.parent / 'ft' / 'train.jsonl'}]",
            f"finetune.eval_inputs=[{run_dir.parent / 'ft' / 'heldout.jsonl'}]",
            *extra,
        )
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, ray_session: None) -> Path:
    """A small corpus tokenized once, and a small fine-tune set cut from the shipped sample."""
    from pipeline.data.build import tokenize_corpus

    root = tmp_path_factory.mktemp("train")
    (root / "corpus").mkdir()
    for play in PLAYS:
        shutil.copy(REPO / "data" / "sample" / "shakespeare" / play, root / "corpus" / play)
    (root / "ft").mkdir()
    for name, count in (("train.jsonl", 96), ("heldout.jsonl", 24)):
        lines = (REPO / "data" / "sample" / "finetune" / name).read_text().splitlines()[:count]
        (root / "ft" / name).write_text("\n".join(lines) + "\n")
    tokenize_corpus(_config(root / "a"))
    return root


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps lost or duplicated: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def pretrained(workspace: Path) -> dict:
    from pipeline.train.driver import pretrain

    return pretrain(_config(workspace / "a"))


def test_pretrain_trains_shards_and_exports(workspace: Path, pretrained: dict) -> None:
    run = workspace / "a"
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    # ZeRO-3: each of the 2 ranks holds about half of the parameters
    shards, total = pretrained["shard_numel"], pretrained["total_numel"]
    assert len(shards) == 2 and all(abs(s / total - 0.5) < 0.05 for s in shards)
    assert pretrained["unigram_ce"] > 0 and np.isfinite(pretrained["val_loss"])
    model, info = load_export(pretrained["export"])
    assert info.metadata["stage"] == "pretrain" and info.model.n_layer == 2
    assert (run / "pretrain" / "loss_curve.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= rows[-1].keys()
    assert rows[2]["val_loss"] > 0 and rows[2]["val_ppl"] > 1


def test_stopped_and_resumed_run_matches_uninterrupted(workspace: Path, pretrained: dict) -> None:
    from pipeline.train.driver import pretrain

    run = workspace / "b"
    shutil.copytree(workspace / "a" / "data", run / "data")
    paused = pretrain(_config(run, "train.stop_after_steps=3"))
    assert paused["status"] == "paused" and paused["steps"] == 3
    resumed = pretrain(_config(run))
    assert resumed["steps"] == 6
    expected, got = _losses(workspace / "a"), _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    a, _ = load_export(pretrained["export"])
    b, _ = load_export(resumed["export"])
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_fused_loss_trains_as_the_full_logits_do(workspace: Path, pretrained: dict) -> None:
    """ZeRO-3 with 2 workers: the chunked LM-head loss (the workspace's runs) and the full-logits path give the same
    losses step by step; only the order of floating-point sums differs."""
    from pipeline.train.driver import pretrain

    run = workspace / "full-logits"
    shutil.copytree(workspace / "a" / "data", run / "data")
    pretrain(_config(run, "train.loss_chunk_rows=null", "train.stop_after_steps=3"))
    expected, got = _losses(workspace / "a"), _losses(run)
    assert sorted(got) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=0), (step, got[step], expected[step])


def test_finished_run_is_skipped_and_other_model_is_refused(workspace: Path, pretrained: dict) -> None:
    from pipeline.train.driver import TrainError, pretrain

    again = pretrain(_config(workspace / "a"))
    assert again["export"] == pretrained["export"]
    with pytest.raises(TrainError, match="checkpoints of another pretrain setup"):
        pretrain(_config(workspace / "a", "model.dropout=0.1"))


def test_missing_dataset_fails_before_any_worker(tmp_path: Path) -> None:
    from pipeline.train.plan import TrainError, make_plan

    with pytest.raises(TrainError, match="run `raygpt tokenize` first"):
        make_plan(_config(tmp_path / "empty"), "pretrain")
    with pytest.raises(TrainError, match="run `raygpt tokenize-finetune` first"):
        make_plan(_config(tmp_path / "empty"), "finetune")


def test_corrupt_or_mismatched_dataset_fails_before_any_worker(workspace: Path, tmp_path: Path) -> None:
    from pipeline.train.plan import TrainError, make_plan

    with pytest.raises(TrainError, match="packed with data.context_length=32, the config says 16"):
        make_plan(_config(workspace / "a", "data.context_length=16"), "pretrain")
    run = tmp_path / "corrupt"
    shutil.copytree(workspace / "a" / "data", run / "data")
    (run / "data" / "manifest.json").write_text("{ not json")
    with pytest.raises(TrainError, match="cannot be used"):
        make_plan(_config(run), "pretrain")
    shutil.rmtree(run / "data")
    shutil.copytree(workspace / "a" / "data", run / "data")
    next((run / "data" / "train").glob("*.parquet")).unlink()
    with pytest.raises(TrainError, match="cannot be used: .*missing"):
        make_plan(_config(run), "pretrain")


def test_export_latest_and_hugging_face_round_trip(workspace: Path, pretrained: dict, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from pipeline.export.hf import export_hf, import_hf
    from pipeline.train.consolidate import export_latest

    again = export_latest(_config(workspace / "a"), "pretrain", str(tmp_path / "again"))
    ours, _ = load_export(pretrained["export"])
    for name, tensor in load_export(again)[0].state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name

    export_hf(pretrained["export"], tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([[464, 5044, 286, 14008, 50256, 11, 290]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)
    imported = import_hf(tmp_path / "hf", str(tmp_path / "imported"))
    back, _ = load_export(imported)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_finetune_masks_prompt_and_reports_exact_match(workspace: Path, pretrained: dict) -> None:
    from pipeline.data.finetune import tokenize_finetune
    from pipeline.train.driver import finetune

    config = _config(workspace / "a")
    tokenize_finetune(config)
    summary = finetune(config)
    assert summary["steps"] == 3
    before, after = summary["exact_match_before"], summary["exact_match_after"]
    assert before["n"] == after["n"] == 24 and 0 <= after["exact_match"] <= 1
    assert np.isfinite(summary["val_loss"])
    _, info = load_export(summary["export"])
    assert info.metadata["stage"] == "finetune"


def test_finetune_batches_put_loss_on_completions_only() -> None:
    from pipeline.train.batches import IGNORE, FinetuneBatches

    batches = FinetuneBatches.__new__(FinetuneBatches)
    batches.pad_id = 50256
    ids = np.array([10, 11, 12, 20, 21, 50256])
    mask = np.array([False, False, False, True, True, True])
    inputs, targets = batches._tensors([(ids, mask), (ids[:4], mask[:4])])
    assert inputs.tolist() == [[10, 11, 12, 20, 21], [10, 11, 12, 50256, 50256]]
    assert targets.tolist() == [[IGNORE, IGNORE, 20, 21, 50256], [IGNORE, IGNORE, 20, IGNORE, IGNORE]]
