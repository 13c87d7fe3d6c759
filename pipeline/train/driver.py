"""The Train stage on the driver: plan, skip when up to date, run Ray Train's TorchTrainer, consolidate, summarize.

``raygpt pretrain`` and ``raygpt finetune`` call :func:`pretrain` and :func:`finetune`. Everything a user can get
wrong (no dataset, a dataset that does not fit the model, checkpoints of another model) is caught before any
worker starts (:func:`pipeline.train.plan.make_plan`, :func:`pipeline.train.checkpoint.check_resumable`). Starting
the same run again resumes from its latest checkpoint; a run already trained to its last step is not trained
again (a rerun after a failed export or scoring only exports and scores); a finished run is skipped.

A run that diverges (a non-finite loss, gradient norm or validation loss, or weights that give a non-finite loss:
:func:`pipeline.train.worker.divergence`) stops on every rank before it checkpoints the diverged step, so Ray
Train's newest checkpoint is still the last good one, whatever ``train.num_to_keep``. The run fails at once with
a :class:`TrainError` naming the step and the value; it is not retried (``train.max_failures`` is for failures of
workers, and a divergence repeats deterministically). The stage state records it: starting the stage again with
the same plan is refused before any worker starts, since it would replay the same steps from the same
checkpoint; with any setting of the plan changed (a lower learning rate, more warmup, tighter clipping) it
resumes from the last good checkpoint; ``--fresh`` starts over.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout, Stage, is_complete_export
from pipeline.runlock import run_lock
from pipeline.train import checkpoint
from pipeline.train.consolidate import consolidate
from pipeline.train.plan import TrainError, TrainPlan, load_dataset_manifest, make_plan

__all__ = ["TrainError", "finetune", "pretrain", "run_trainer"]


def run_trainer(config: PipelineConfig, plan: TrainPlan, stop_at: int | None = None) -> Any:
    """Run (or resume) the Ray Train job for ``plan`` up to step ``stop_at`` (default: the plan's last); returns
    Ray's Result.

    ``stop_at`` is absolute and travels in the loop config, which Ray Train hands unchanged to every worker group
    it starts: a group restarted after a failure (``train.max_failures``) from a later checkpoint stops where the
    invocation was told to, not ``stop_after_steps`` past its restore point."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.console import ProgressDisplay
    from pipeline.raycluster import connect
    from pipeline.train.worker import train_loop_per_worker

    layout = RunLayout.of(config)
    connect(config.run)
    resources = {"CPU": config.train.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = 1
    display = ProgressDisplay(plan.stage, plan.max_steps, config.run.progress_every_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "plan": plan.to_json(),
            "stop_at": plan.max_steps if stop_at is None else stop_at,
            "progress": display.board,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=layout.experiment_name(plan.stage),
            storage_path=layout.storage_path,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.num_to_keep),
        ),
    )
    try:
        with display:
            result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the root cause without a wall of traceback
        raise TrainError(f"{plan.stage} failed: {_root_cause(exc)}") from exc
    if getattr(result, "error", None):
        raise TrainError(f"{plan.stage} failed: {_root_cause(result.error)}")
    if result.checkpoint is None and diverged(result) is None:
        raise TrainError(f"{plan.stage} finished without a checkpoint")
    return result


def diverged(result: Any) -> dict[str, Any] | None:
    """The divergence the workers stopped at (step, what, value), or None when they did not."""
    return (getattr(result, "return_value", None) or {}).get("diverged")


def _stop_diverged(layout: RunLayout, plan: TrainPlan, divergence: dict[str, Any], result: Any) -> None:
    """Record a divergence in the stage state and fail with it. Nothing after the diverged step was
    checkpointed, so Ray Train's newest checkpoint (``result.checkpoint``) is the last good one."""
    kept = checkpoint_location(layout, result) if result.checkpoint is not None else None
    kept_step = int(result.metrics.get("step", 0)) if kept else 0
    record = {**divergence, "checkpoint": kept, "checkpoint_step": kept_step}
    checkpoint.write_stage_state(
        layout,
        plan.stage,
        {"status": "diverged", "fingerprint": plan.fingerprint(), "plan": plan.to_json(), "diverged": record},
    )
    resume = f"resume from the checkpoint at step {kept_step} ({kept})" if kept else "start over"
    raise TrainError(
        f"{plan.stage} diverged at step {divergence['step']}: {divergence['what']} is {divergence['value']}; "
        f"nothing after step {kept_step} was checkpointed. The same settings would repeat these steps: change them "
        f"(e.g. a lower learning rate) to {resume}, or pass --fresh to start over"
    )


def _refuse_repeat(stage: Stage, state: dict[str, Any]) -> None:
    record = state["diverged"]
    raise TrainError(
        f"{stage} diverged at step {record['step']} ({record['what']} is {record['value']}) with these settings, "
        f"which would repeat the same steps from the checkpoint at step {record['checkpoint_step']}: change them "
        "(e.g. a lower learning rate) to resume from that checkpoint, or pass --fresh to start over"
    )


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else exc.__class__.__name__


def _train(config: PipelineConfig, stage: Stage, fresh: bool) -> tuple[TrainPlan, dict[str, Any] | None, Any]:
    """Plan, skip when up to date, else run; returns (plan, cached summary or None, Ray result or None)."""
    plan = make_plan(config, stage)
    layout = RunLayout.of(config)
    state = checkpoint.read_stage_state(layout, stage)
    target = layout.stage_export(stage)
    up_to_date = (
        not fresh
        and state is not None
        and state.get("status") == "complete"
        and state.get("plan") == plan.to_json()
        and is_complete_export(target)
    )
    if up_to_date:
        print(f"raygpt {stage}: up to date ({plan.max_steps} steps, export at {target}); skipping")
        return plan, {**state["summary"], "cached": True}, None
    if not fresh and state is not None and state.get("status") == "diverged" and state.get("plan") == plan.to_json():
        _refuse_repeat(stage, state)
    checkpoint.check_resumable(layout, plan, fresh)
    checkpoint.write_stage_state(
        layout, stage, {"status": "running", "fingerprint": plan.fingerprint(), "plan": plan.to_json()}
    )
    previous = checkpoint.registered(layout, stage)
    start = int(previous.metrics.get("step", 0)) if previous is not None else 0  # where Ray Train resumes
    if previous is not None and start >= plan.max_steps:
        # trained to the end by an earlier invocation that failed afterwards (export, scoring): train no more
        print(f"raygpt {stage}: already trained ({plan.max_steps} steps); exporting its last checkpoint")
        return plan, None, previous
    print(
        f"raygpt {stage}: {plan.num_workers} workers x micro-batch {plan.micro_batch_size} x accumulation "
        f"{plan.grad_accum} = {plan.tokens_per_step} tokens/step, {plan.max_steps} steps, lr {plan.learning_rate:g}"
    )
    stop_after = config.train.stop_after_steps
    result = run_trainer(config, plan, min(plan.max_steps, start + stop_after) if stop_after else plan.max_steps)
    divergence = diverged(result)
    if divergence is not None:
        _stop_diverged(layout, plan, divergence, result)
    step = int(result.metrics.get("step", 0))
    if step < plan.max_steps:  # train.stop_after_steps ended this invocation early
        summary = {"stage": stage, "status": "paused", "steps": step, "checkpoint": checkpoint_location(layout, result)}
        checkpoint.write_stage_state(layout, stage, {**_complete_state(plan, summary), "status": "paused"})
        print(f"raygpt {stage}: stopped at step {step} of {plan.max_steps} (checkpointed); run again to resume")
        return plan, summary, None
    return plan, None, result


def _finish(
    config: PipelineConfig, plan: TrainPlan, result: Any, summary: dict[str, Any], yardstick: float | None
) -> dict[str, Any]:
    stage = plan.stage
    layout = RunLayout.of(config)
    location = checkpoint_location(layout, result)
    rows = checkpoint.read_metrics(location)
    from pipeline.train.metrics import plot_loss_curve

    metrics, plot = layout.metrics_file(stage), layout.loss_curve(stage)
    storage.write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())
    storage.write_bytes(plot, plot_loss_curve(rows, f"raygpt {stage}", yardstick))
    summary["loss_curve"] = plot
    summary["metrics"] = metrics
    val = [r for r in rows if r.get("val_loss") is not None]
    summary.update(
        steps=rows[-1]["step"] if rows else 0,
        tokens=rows[-1]["tokens"] if rows else 0,
        final_loss=rows[-1]["loss"] if rows else None,
        val_loss=val[-1]["val_loss"] if val else None,
        val_ppl=val[-1]["val_ppl"] if val else None,
        checkpoint=location,
        shard_numel=result.metrics.get("shard_numel"),
        total_numel=result.metrics.get("total_numel"),
        node_ids=result.metrics.get("node_ids"),
    )
    scored = [r for r in rows if any(key.startswith("lm_eval/") for key in r)]
    if scored:  # train.eval_tasks: the last evaluation's scores
        summary["tasks"] = {key: value for key, value in scored[-1].items() if key.startswith("lm_eval/")}
    return summary


def checkpoint_location(layout: RunLayout, result: Any) -> str:
    """The URI (or local path) of the checkpoint Ray Train reported (Ray gives its path inside the storage
    filesystem, e.g. ``bucket/key`` without the scheme)."""
    return storage.uri_in(layout.storage_path, result.checkpoint.path)


def pretrain(config: PipelineConfig, fresh: bool = False) -> dict[str, Any]:
    """Pretrain ``model.preset`` on the tokenized corpus; export to <run.dir>/export/pretrained. Holds the run
    dir's lock (:func:`pipeline.runlock.run_lock`): another process in the same run dir is refused."""
    with run_lock(config.run.dir, "pretrain"):
        return _pretrain(config, fresh)


def _pretrain(config: PipelineConfig, fresh: bool) -> dict[str, Any]:
    plan, cached, result = _train(config, "pretrain", fresh)
    if cached is not None:
        return cached
    from pipeline.data.reader import SequenceStore
    from pipeline.train.metrics import token_counts, unigram_cross_entropy, unigram_cross_entropy_on

    started = time.time()
    manifest = load_dataset_manifest(config, "pretrain")
    counts = token_counts(SequenceStore(manifest, "train"), plan.tokenizer)
    unigram = unigram_cross_entropy(counts)
    val_store = SequenceStore(manifest, "val")
    unigram_val = unigram_cross_entropy_on(counts, val_store) if len(val_store) else None
    target = RunLayout.of(config).stage_export("pretrain")
    # unigram_ce: entropy of the train shards' own unigram distribution; unigram_val_ce: that unigram model
    # (add-one smoothed) on the validation targets, the like-for-like yardstick for val_loss.
    summary: dict[str, Any] = {"stage": "pretrain", "unigram_ce": unigram, "unigram_val_ce": unigram_val}
    summary = _finish(config, plan, result, summary, unigram_val or unigram)
    from pipeline.train.batches import source_usage

    summary.update(source_usage(manifest, summary["steps"] * plan.global_batch, plan.seed))
    summary["export"] = consolidate(
        summary["checkpoint"],
        plan,
        target,
        {"stage": "pretrain", "steps": summary["steps"], "val_loss": summary["val_loss"]},
    )
    summary["export_seconds"] = round(time.time() - started, 1)
    checkpoint.write_stage_state(RunLayout.of(config), "pretrain", _complete_state(plan, summary))
    yardstick = unigram_val or unigram
    print(
        f"raygpt pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens; val CE {summary['val_loss']:.3f} "
        f"nats vs unigram CE {yardstick:.3f} on the same tokens (margin {yardstick - summary['val_loss']:.2f}; "
        f"train-shard unigram entropy {unigram:.3f}); export {summary['export']}"
    )
    return summary


def finetune(config: PipelineConfig, fresh: bool = False) -> dict[str, Any]:
    """Fine-tune an export on prompt/completion data (loss on completions only); export to
    <run.dir>/export/finetuned, then report held-out exact match before and after. Holds the run dir's lock."""
    with run_lock(config.run.dir, "finetune"):
        return _finetune(config, fresh)


def _finetune(config: PipelineConfig, fresh: bool) -> dict[str, Any]:
    from pipeline.data.reader import heldout_examples
    from pipeline.train.evaluate import exact_match

    plan, cached, result = _train(config, "finetune", fresh)
    if cached is not None:
        return cached
    assert plan.init_export is not None
    examples = heldout_examples(load_dataset_manifest(config, "finetune"))
    summary: dict[str, Any] = {"stage": "finetune", "init_from": plan.init_export}
    summary = _finish(config, plan, result, summary, None)
    target = RunLayout.of(config).stage_export("finetune")
    summary["export"] = consolidate(
        summary["checkpoint"], plan, target, {"stage": "finetune", "steps": summary["steps"], "from": plan.init_export}
    )
    # scored only once exported: a scoring failure leaves the trained model in place, and a rerun only scores
    scoring = {"context_length": plan.context_length, "tokenizer_file": config.data.tokenizer_file}
    before = summary["exact_match_before"] = exact_match(plan.init_export, examples, **scoring)
    summary["exact_match_after"] = exact_match(target, examples, **scoring)
    checkpoint.write_stage_state(RunLayout.of(config), "finetune", _complete_state(plan, summary))
    print(
        f"raygpt finetune: {summary['steps']} steps; completion-only val loss {summary['val_loss']:.3f}; held-out "
        f"exact match {before['exact_match']:.1%} -> {summary['exact_match_after']['exact_match']:.1%} "
        f"(n={before['n']}); export {summary['export']}"
    )
    return summary


def _complete_state(plan: TrainPlan, summary: dict[str, Any]) -> dict[str, Any]:
    return {"status": "complete", "fingerprint": plan.fingerprint(), "plan": plan.to_json(), "summary": summary}
