"""What one training run does, resolved on the driver before any worker starts.

The plan is a plain, JSON-serializable record: :func:`make_plan` validates the config against the data manifest
and the model (everything a user can get wrong fails here, with :class:`TrainError`, before any worker starts),
derives the batch geometry (micro-batch x accumulation x workers), and the driver ships the plan to the Ray Train
workers. Its :meth:`TrainPlan.fingerprint` is what a checkpoint must match to be resumed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout, Stage
from pipeline.model.presets import PRESETS

__all__ = ["Stage", "TrainError", "TrainPlan", "batch_geometry", "load_dataset_manifest", "make_plan"]


class TrainError(RuntimeError):
    """A training run cannot start or did not finish; the message says why and what to do."""


@dataclass(frozen=True)
class TrainPlan:
    stage: Stage
    model: dict[str, Any]  # GPTConfig.to_dict()
    data_dir: str  # the Data stage's output (manifest.json and shards)
    run_dir: str  # metrics, checkpoints (through Ray Train) and exports live under it
    max_steps: int
    micro_batch_size: int
    grad_accum: int
    num_workers: int
    context_length: int  # tokens per sequence fed to the model (data context_length)
    learning_rate: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    checkpoint_every: int
    eval_every: int
    eval_batches: int
    seed: int
    use_gpu: bool
    activation_checkpointing: bool
    loss_chunk_rows: int | None = None  # the fused LM-head loss's chunk (None: full logits)
    peak_tflops: float | None = None
    init_export: str | None = None  # weights to start from (fine-tuning)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    tokenizer: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""  # the dataset manifest's fingerprint
    init_fingerprint: str = ""  # sha256 of the weights fine-tuning starts from
    eval_tasks: tuple[str, ...] = ()  # lm-eval tasks scored at each validation evaluation (YAML files absolute)
    eval_task_limit: int | None = None
    tokenizer_file: str | None = None  # data.tokenizer_file, for an encoding that is not shipped

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, all workers together."""
        return self.micro_batch_size * self.grad_accum * self.num_workers

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.context_length

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainPlan:
        data = dict(data)
        data["betas"] = tuple(data["betas"])
        data["eval_tasks"] = tuple(data.get("eval_tasks", ()))
        return cls(**data)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and the run that resumes from it."""
        return {
            "stage": self.stage,
            "model": self.model,
            "num_workers": self.num_workers,  # ZeRO-3 shards are per rank (DeepSpeed #5405)
            "context_length": self.context_length,
            "seed": self.seed,  # the data order (SequenceOrder) and the initialization
            "data": self.data_fingerprint,
            "init": self.init_fingerprint,
        }


def batch_geometry(
    batch_tokens: int | None, micro_batch_size: int, num_workers: int, context_length: int
) -> tuple[int, str | None]:
    """Gradient-accumulation steps for a global batch given in tokens, and a note when it had to be rounded."""
    per_pass = micro_batch_size * num_workers * context_length
    if batch_tokens is None:
        return 1, None
    accum = max(1, round(batch_tokens / per_pass))
    if accum * per_pass != batch_tokens:
        return accum, (
            f"train.batch_tokens={batch_tokens} is not a multiple of micro_batch_size x num_workers x context "
            f"({per_pass}); using {accum * per_pass} tokens per step ({accum} accumulation steps)"
        )
    return accum, None


def load_dataset_manifest(config: PipelineConfig, stage: Stage) -> Any:
    """The manifest of the stage's dataset; TrainError naming the command to run when there is none."""
    from pipeline.data.errors import DataError
    from pipeline.data.manifest import MANIFEST
    from pipeline.data.reader import load_manifest

    location = RunLayout.of(config).dataset(stage)
    command = "raygpt tokenize" if stage == "pretrain" else "raygpt tokenize-finetune"
    if not storage.exists(storage.join(storage.resolve(location), MANIFEST)):
        raise TrainError(f"no dataset at {location}: run `{command}` first (with the same --config/--set)")
    try:
        return load_manifest(location)
    except DataError as exc:
        raise TrainError(f"the dataset at {location} cannot be used: {exc}") from None


def make_plan(config: PipelineConfig, stage: Stage) -> TrainPlan:
    """Check data against model and derive the run's geometry; raises TrainError before any worker starts."""
    from pipeline.export.format import ExportError, read_export_info

    manifest = load_dataset_manifest(config, stage)
    layout = RunLayout.of(config)
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
        init_export = config.finetune.init_from or layout.stage_export("pretrain")
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
    eval_tasks = tuple(
        str(Path(name).resolve()) if name.endswith((".yaml", ".yml")) else name for name in settings.eval_tasks
    )
    if eval_tasks:
        from pipeline.train.task_eval import check_tasks

        try:
            check_tasks(list(eval_tasks))
        except ValueError as exc:
            raise TrainError(str(exc)) from None
    if n_vocab > model.vocab_size:
        raise TrainError(
            f"the dataset's tokenizer has {n_vocab} tokens but the model's vocabulary is {model.vocab_size}"
        )
    context_length = int(manifest.context_length)
    if stage == "pretrain" and context_length != config.data.context_length:
        raise TrainError(
            f"the dataset at {layout.dataset(stage)} was packed with data.context_length={context_length}, the "
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
        data_dir=storage.absolute(layout.dataset(stage)),
        run_dir=layout.storage_path,
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
        loss_chunk_rows=settings.loss_chunk_rows,
        peak_tflops=settings.peak_tflops,
        init_export=storage.absolute(str(init_export)) if init_export else None,
        tokenizer=tokenizer,
        data_fingerprint=str(manifest.fingerprint),
        init_fingerprint=init_fingerprint,
        eval_tasks=eval_tasks,
        eval_task_limit=settings.eval_task_limit,
        tokenizer_file=config.data.tokenizer_file,
    )
