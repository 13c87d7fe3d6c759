"""ZeRO-3 checkpoint -> export: gather every rank's shards into one fp32 state dict and save it as an export.

It runs as a Ray task, so DeepSpeed stays off the driver and the task reads the checkpoint wherever the cluster
stores it (a remote checkpoint is copied to a temporary directory, removed once read). Checkpoints are read
weights-only (:func:`pipeline.train.deepspeed.weights_only_loads`).
"""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout, Stage
from pipeline.train import checkpoint
from pipeline.train.plan import TrainError, TrainPlan, make_plan


def consolidate(
    checkpoint_dir: str, plan: TrainPlan, target: str, metadata: dict[str, Any], overwrite: bool = False
) -> str:
    """The checkpoint at ``checkpoint_dir`` (of a run planned as ``plan``) as an export at ``target``."""
    import ray

    @ray.remote(num_cpus=1)
    def _consolidate() -> str:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from pipeline.export.format import save_export
        from pipeline.model.gpt import GPTConfig
        from pipeline.train.deepspeed import weights_only_loads

        weights_only_loads()
        state = checkpoint.read_state(checkpoint_dir)
        with storage.local_copy(checkpoint_dir) as local:
            weights = get_fp32_state_dict_from_zero_checkpoint(str(local), tag=state["tag"])
        model_config = GPTConfig.from_dict(plan.model)
        return save_export(weights, model_config, target, plan.tokenizer, metadata=metadata, overwrite=overwrite)

    return ray.get(_consolidate.remote())


def export_latest(config: PipelineConfig, stage: Stage, out: str | None = None, overwrite: bool = False) -> str:
    """Consolidate the newest ZeRO-3 checkpoint of ``stage`` into an export (``raygpt export``)."""
    layout = RunLayout.of(config)
    found = checkpoint.latest_checkpoint(layout, stage)
    if found is None:
        raise TrainError(f"no {stage} checkpoint in {config.run.dir}: run `raygpt {stage}` first")
    location, step = found
    state = checkpoint.read_stage_state(layout, stage)
    plan = TrainPlan.from_json(state["plan"]) if state and "plan" in state else make_plan(config, stage)
    target = out or layout.stage_export(stage)
    metadata = {"stage": stage, "steps": step, "checkpoint": location}
    return consolidate(location, plan, target, metadata, overwrite=overwrite)
