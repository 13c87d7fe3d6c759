"""The Train stage on the driver: validate, plan, run Ray Train's TorchTrainer, consolidate, export, summarize.

``raygpt pretrain`` and ``raygpt finetune`` call :func:`pretrain` and :func:`finetune`. Everything a user can get
wrong (no dataset, a dataset that does not fit the model, checkpoints of another model) is caught here, before
any worker starts. Starting the same run again resumes from its latest checkpoint; a finished run is skipped.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.model import GPTConfig
from pipeline.presets import PRESETS
from pipeline.train_plan import Stage, TrainPlan, batch_geometry

STATE_FILE = "state.json"


class TrainError(RuntimeError):
    """A training run cannot start or did not finish; the message says why and what to do."""


def data_dir(config: PipelineConfig, stage: Stage) -> str:
    return storage.join(config.run.dir, "data" if stage == "pretrain" else "finetune_data")


def export_dir(config: PipelineConfig, name: str) -> str:
    return storage.join(config.run.dir, "export", name)


def stage_dir(config: PipelineConfig, stage: Stage) -> Path:
    return storage.local_path(config.run.dir) / stage if not storage.is_remote(config.run.dir) else Path()


def experiment_name(config: PipelineConfig, stage: Stage) -> str:
    return f"{config.run.name}-{stage}"


def _absolute(location: str) -> str:
    """Workers run in another directory than the driver: local paths travel absolute."""
    return location if storage.is_remote(location) else str(storage.local_path(location).resolve())


def _storage_path(config: PipelineConfig) -> str:
    return _absolute(config.run.dir)


def _manifest(config: PipelineConfig, stage: Stage) -> Any:
    from pipeline.data.errors import DataError
    from pipeline.data.reader import load_manifest

    location = data_dir(config, stage)
    command = "raygpt tokenize" if stage == "pretrain" else "raygpt tokenize-finetune"
    if not storage.exists(storage.join(location, "manifest.json")):
        raise TrainError(f"no dataset at {location}: run `{command}` first (with the same --config/--set)")
    try:
        return load_manifest(location)
    except DataError as exc:
        raise TrainError(f"the dataset at {location} cannot be used: {exc}") from None


def make_plan(config: PipelineConfig, stage: Stage) -> TrainPlan:
    """Check data against model and derive the run's geometry; raises TrainError before any worker starts."""
    from pipeline.export import ExportError, read_export_info

    manifest = _manifest(config, stage)
    tokenizer = dict(manifest.tokenizer)
    n_vocab = int(tokenizer.get("n_vocab", 0))
    init_export = None
    init_fingerprint = ""
    if stage == "pretrain":
        model = config.model.gpt_config(vocab_size=n_vocab or None)
        settings = config.train
        learning_rate = settings.learning_rate or PRESETS[config.model.preset].learning_rate
        max_steps, micro = settings.max_steps, settings.micro_batch_size
    else:
        init_export = config.finetune.init_from or export_dir(config, "pretrained")
        try:
            info, _ = read_export_info(init_export)
        except ExportError as exc:
            raise TrainError(
                f"fine-tuning starts from an export: {exc} (run `raygpt pretrain` first, "
                "or set finetune.init_from / use `raygpt import-hf`)"
            ) from None
        model = info.model
        init_fingerprint = info.weights_sha256
        if info.tokenizer.get("sha256") and tokenizer.get("sha256") and info.tokenizer["sha256"] != tokenizer["sha256"]:
            raise TrainError(f"export {init_export} uses another tokenizer than the fine-tune dataset")
        settings = config.train
        learning_rate, max_steps, micro = (
            config.finetune.learning_rate,
            config.finetune.max_steps,
            config.finetune.micro_batch_size,
        )
    if n_vocab > model.vocab_size:
        raise TrainError(
            f"the dataset's tokenizer has {n_vocab} tokens but the model's vocabulary is {model.vocab_size}"
        )
    context_length = int(manifest.context_length)
    if stage == "pretrain" and context_length != config.data.context_length:
        raise TrainError(
            f"the dataset at {data_dir(config, stage)} was packed with data.context_length={context_length}, the "
            f"config says {config.data.context_length}: run `raygpt tokenize --overwrite` or restore the setting"
        )
    if stage == "pretrain" and context_length > model.context_length:
        raise TrainError(
            f"the dataset packs {context_length}-token sequences but model {config.model.preset!r} has a "
            f"{model.context_length}-token context"
        )
    if stage == "finetune":
        context_length = min(context_length, model.context_length)
    batch_tokens = (settings.batch_tokens or PRESETS[config.model.preset].batch_tokens) if stage == "pretrain" else None
    accum, note = batch_geometry(batch_tokens, micro, settings.num_workers, context_length)
    if note:
        print(f"raygpt {stage}: {note}")
    return TrainPlan(
        stage=stage,
        model=model.to_dict(),
        data_dir=_absolute(data_dir(config, stage)),
        run_dir=_storage_path(config),
        max_steps=max_steps,
        micro_batch_size=micro,
        grad_accum=accum,
        num_workers=settings.num_workers,
        context_length=context_length,
        learning_rate=learning_rate,
        min_lr_ratio=settings.min_lr_ratio,
        warmup_steps=min(settings.warmup_steps, max(max_steps // 10, 1))
        if stage == "finetune"
        else settings.warmup_steps,
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        checkpoint_every=settings.checkpoint_every,
        eval_every=settings.eval_every,
        eval_batches=settings.eval_batches,
        seed=config.run.seed,
        use_gpu=settings.use_gpu,
        activation_checkpointing=settings.activation_checkpointing,
        peak_tflops=settings.peak_tflops,
        init_export=_absolute(str(init_export)) if init_export else None,
        tokenizer=tokenizer,
        data_fingerprint=str(manifest.fingerprint),
        init_fingerprint=init_fingerprint,
    )


def _read_state(config: PipelineConfig, stage: Stage) -> dict[str, Any] | None:
    path = storage.join(config.run.dir, stage, STATE_FILE)
    if storage.is_remote(path) or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def _write_state(config: PipelineConfig, stage: Stage, state: dict[str, Any]) -> None:
    if storage.is_remote(config.run.dir):
        return
    path = Path(storage.join(config.run.dir, stage, STATE_FILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _check_resumable(config: PipelineConfig, plan: TrainPlan, fresh: bool) -> None:
    """Resuming needs checkpoints of the same model, data and world size; otherwise refuse (or start over with
    ``fresh``). An experiment folder without any checkpoint holds nothing worth keeping."""
    experiment = storage.join(_storage_path(config), experiment_name(config, plan.stage))
    found = None if fresh else latest_checkpoint(config, plan.stage)
    if found is None:
        if not storage.is_remote(experiment):
            shutil.rmtree(experiment, ignore_errors=True)
        return
    local = storage.download_dir(found[0])
    previous = json.loads((local / "trainer_state.json").read_text()).get("fingerprint")
    if previous != plan.fingerprint():
        changed = sorted(k for k in plan.fingerprint() if (previous or {}).get(k) != plan.fingerprint()[k])
        raise TrainError(
            f"{experiment} holds checkpoints of another {plan.stage} setup (different {', '.join(changed)}); "
            "use another run.dir or pass --fresh to start over"
        )


def run_trainer(config: PipelineConfig, plan: TrainPlan) -> Any:
    """Run (or resume) the Ray Train job for ``plan``; returns Ray's Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.raycluster import connect
    from pipeline.train_worker import train_loop_per_worker

    connect(config.run)
    resources = {"CPU": config.train.cpus_per_worker}
    if plan.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan.to_json(), "stop_after_steps": config.train.stop_after_steps},
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers, use_gpu=plan.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=experiment_name(config, plan.stage),
            storage_path=_storage_path(config),
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.num_to_keep),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the root cause without a wall of traceback
        raise TrainError(f"{plan.stage} failed: {_root_cause(exc)}") from exc
    if getattr(result, "error", None):
        raise TrainError(f"{plan.stage} failed: {_root_cause(result.error)}")
    if result.checkpoint is None:
        raise TrainError(f"{plan.stage} finished without a checkpoint")
    return result


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else exc.__class__.__name__


def consolidate(checkpoint_dir: str, plan: TrainPlan, target: str, metadata: dict[str, Any]) -> str:
    """ZeRO-3 shards of a checkpoint -> one export. Runs as a Ray task, so DeepSpeed stays off the driver and
    the task can read the checkpoint wherever the cluster stores it."""
    import ray

    @ray.remote(num_cpus=1)
    def _consolidate() -> str:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from pipeline.export import save_export
        from pipeline.train_worker import weights_only_loads

        weights_only_loads()
        local = storage.download_dir(checkpoint_dir)
        state = json.loads((local / "trainer_state.json").read_text())
        weights = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=state["tag"])
        return save_export(weights, GPTConfig.from_dict(plan.model), target, plan.tokenizer, metadata=metadata)

    return ray.get(_consolidate.remote())


def _checkpoint_metrics(checkpoint_dir: str) -> list[dict[str, Any]]:
    local = storage.download_dir(checkpoint_dir)
    return [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train(config: PipelineConfig, stage: Stage, fresh: bool) -> tuple[TrainPlan, dict[str, Any] | None, Any]:
    """Plan, skip when up to date, else run; returns (plan, cached summary or None, Ray result or None)."""
    plan = make_plan(config, stage)
    state = _read_state(config, stage)
    target = export_dir(config, "pretrained" if stage == "pretrain" else "finetuned")
    up_to_date = (
        not fresh
        and state is not None
        and state.get("status") == "complete"
        and state.get("plan") == plan.to_json()
        and storage.exists(storage.join(target, "config.json"))
    )
    if up_to_date:
        print(f"raygpt {stage}: up to date ({plan.max_steps} steps, export at {target}); skipping")
        return plan, {**state["summary"], "cached": True}, None
    _check_resumable(config, plan, fresh)
    _write_state(config, stage, {"status": "running", "fingerprint": plan.fingerprint(), "plan": plan.to_json()})
    print(
        f"raygpt {stage}: {plan.num_workers} workers x micro-batch {plan.micro_batch_size} x accumulation "
        f"{plan.grad_accum} = {plan.tokens_per_step} tokens/step, {plan.max_steps} steps, lr {plan.learning_rate:g}"
    )
    result = run_trainer(config, plan)
    step = int(result.metrics.get("step", 0))
    if step < plan.max_steps:  # train.stop_after_steps ended this invocation early
        summary = {"stage": stage, "status": "paused", "steps": step, "checkpoint": result.checkpoint.path}
        _write_state(config, stage, {**_complete_state(plan, summary), "status": "paused"})
        print(f"raygpt {stage}: stopped at step {step} of {plan.max_steps} (checkpointed); run again to resume")
        return plan, summary, None
    return plan, None, result


def _finish(
    config: PipelineConfig, plan: TrainPlan, result: Any, summary: dict[str, Any], yardstick: float | None
) -> dict[str, Any]:
    stage = plan.stage
    rows = _checkpoint_metrics(result.checkpoint.path)
    if not storage.is_remote(config.run.dir):
        folder = storage.local_path(config.run.dir) / stage
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot = folder / "loss_curve.png"
        from pipeline.train_metrics import plot_loss_curve

        plot_loss_curve(rows, plot, f"raygpt {stage}", yardstick)
        summary["loss_curve"] = str(plot)
        summary["metrics"] = str(folder / "metrics.jsonl")
    val = [r for r in rows if r.get("val_loss") is not None]
    summary.update(
        steps=rows[-1]["step"] if rows else 0,
        tokens=rows[-1]["tokens"] if rows else 0,
        final_loss=rows[-1]["loss"] if rows else None,
        val_loss=val[-1]["val_loss"] if val else None,
        val_ppl=val[-1]["val_ppl"] if val else None,
        checkpoint=result.checkpoint.path,
        shard_numel=result.metrics.get("shard_numel"),
        total_numel=result.metrics.get("total_numel"),
        node_ids=result.metrics.get("node_ids"),
    )
    return summary


def pretrain(config: PipelineConfig, fresh: bool = False) -> dict[str, Any]:
    """Pretrain ``model.preset`` on the tokenized corpus; export to <run.dir>/export/pretrained."""
    plan, cached, result = _train(config, "pretrain", fresh)
    if cached is not None:
        return cached
    from pipeline.data.reader import SequenceStore
    from pipeline.train_metrics import token_counts, unigram_cross_entropy, unigram_cross_entropy_on

    started = time.time()
    manifest = _manifest(config, "pretrain")
    counts = token_counts(SequenceStore(manifest, "train"), plan.tokenizer)
    unigram = unigram_cross_entropy(counts)
    val_store = SequenceStore(manifest, "val")
    unigram_val = unigram_cross_entropy_on(counts, val_store) if len(val_store) else None
    target = export_dir(config, "pretrained")
    # unigram_ce: entropy of the train shards' own unigram distribution; unigram_val_ce: that unigram model
    # (add-one smoothed) on the validation targets, the like-for-like yardstick for val_loss.
    summary: dict[str, Any] = {"stage": "pretrain", "unigram_ce": unigram, "unigram_val_ce": unigram_val}
    summary = _finish(config, plan, result, summary, unigram_val or unigram)
    summary["export"] = consolidate(
        result.checkpoint.path,
        plan,
        target,
        {"stage": "pretrain", "steps": summary["steps"], "val_loss": summary["val_loss"]},
    )
    summary["export_seconds"] = round(time.time() - started, 1)
    _write_state(config, "pretrain", _complete_state(plan, summary))
    yardstick = unigram_val or unigram
    print(
        f"raygpt pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens; val CE {summary['val_loss']:.3f} "
        f"nats vs unigram CE {yardstick:.3f} on the same tokens (margin {yardstick - summary['val_loss']:.2f}; "
        f"train-shard unigram entropy {unigram:.3f}); export {summary['export']}"
    )
    return summary


def finetune(config: PipelineConfig, fresh: bool = False) -> dict[str, Any]:
    """Fine-tune an export on prompt/completion data (loss on completions only); report held-out exact match
    before and after; export to <run.dir>/export/finetuned."""
    from pipeline.data.reader import heldout_examples
    from pipeline.evaluate import exact_match

    plan, cached, result = _train(config, "finetune", fresh)
    if cached is not None:
        return cached
    assert plan.init_export is not None
    examples = heldout_examples(_manifest(config, "finetune"))
    before = exact_match(plan.init_export, examples)
    summary: dict[str, Any] = {"stage": "finetune", "init_from": plan.init_export, "exact_match_before": before}
    summary = _finish(config, plan, result, summary, None)
    target = export_dir(config, "finetuned")
    summary["export"] = consolidate(
        result.checkpoint.path, plan, target, {"stage": "finetune", "steps": summary["steps"], "from": plan.init_export}
    )
    summary["exact_match_after"] = exact_match(target, examples)
    _write_state(config, "finetune", _complete_state(plan, summary))
    print(
        f"raygpt finetune: {summary['steps']} steps; completion-only val loss {summary['val_loss']:.3f}; held-out "
        f"exact match {before['exact_match']:.1%} -> {summary['exact_match_after']['exact_match']:.1%} "
        f"(n={before['n']}); export {summary['export']}"
    )
    return summary


def _complete_state(plan: TrainPlan, summary: dict[str, Any]) -> dict[str, Any]:
    return {"status": "complete", "fingerprint": plan.fingerprint(), "plan": plan.to_json(), "summary": summary}


def latest_checkpoint(config: PipelineConfig, stage: Stage) -> tuple[str, int] | None:
    """The newest checkpoint of ``stage`` in this run (any that holds a trainer state), with its step."""
    import pyarrow.fs as pafs

    experiment = storage.join(_storage_path(config), experiment_name(config, stage))
    if not storage.exists(experiment):
        return None
    fs, root = pafs.FileSystem.from_uri(experiment if storage.is_remote(experiment) else f"file://{experiment}")
    best: tuple[str, int] | None = None
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        if entry.type != pafs.FileType.Directory:
            continue
        state_file = f"{entry.path}/trainer_state.json"
        if fs.get_file_info(state_file).type != pafs.FileType.File:
            continue
        with fs.open_input_stream(state_file) as handle:
            step = int(json.loads(handle.read())["step"])
        location = storage.join(experiment, entry.base_name)
        if best is None or step > best[1]:
            best = (location, step)
    return best


def export_latest(config: PipelineConfig, stage: Stage, out: str | None = None) -> str:
    """Consolidate the newest ZeRO-3 checkpoint of ``stage`` into an export (``raygpt export``)."""
    found = latest_checkpoint(config, stage)
    if found is None:
        raise TrainError(f"no {stage} checkpoint in {config.run.dir}: run `raygpt {stage}` first")
    checkpoint, step = found
    state = _read_state(config, stage)
    plan = TrainPlan.from_json(state["plan"]) if state and "plan" in state else make_plan(config, stage)
    target = out or export_dir(config, "pretrained" if stage == "pretrain" else "finetuned")
    return consolidate(checkpoint, plan, target, {"stage": stage, "steps": step, "checkpoint": checkpoint})


def default_export(config: PipelineConfig) -> str:
    """The newest model of this run: fine-tuned, else pretrained, else imported, else the untrained init."""
    for name in ("finetuned", "pretrained", "imported", "init"):
        location = export_dir(config, name)
        if storage.exists(storage.join(location, "config.json")):
            return location
    raise TrainError(f"no export in {storage.join(config.run.dir, 'export')}: train, import-hf or init-export first")
