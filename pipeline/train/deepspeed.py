"""Everything DeepSpeed-specific about a training rank: the ZeRO-3 config, the partitioned model build, activation
checkpointing, the optimizer's parameter groups and weights-only checkpoint loading.

The model (:mod:`pipeline.model.gpt`) knows none of this; it is applied from here, as torchtitan's
``parallelize.py`` applies FSDP and activation checkpointing to a plain model. DeepSpeed itself is imported inside
the functions, so only Ray Train workers and the export task load it, never the driver (ray #50406).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from pipeline.model.gpt import GPT, Block, GPTConfig
from pipeline.train.plan import TrainPlan


def deepspeed_config(plan: TrainPlan) -> dict[str, Any]:
    """The DeepSpeed ZeRO-3 config for a plan: fp32 on CPU, bf16 on GPU, AdamW with GPT-3's betas, gradient
    clipping, linear warmup then cosine decay to ``min_lr_ratio`` of the peak."""
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": plan.grad_clip,
        "bf16": {"enabled": plan.use_gpu},
        "zero_optimization": {
            "stage": 3,
            "contiguous_gradients": True,
            "overlap_comm": plan.use_gpu,
            # Over gloo every collective costs about a millisecond however small. With DeepSpeed's default (1e5),
            # parameters under 100k elements stay whole on every rank and each is all-gathered on its own after
            # every optimizer step: 51 calls, ~50 ms of a ~1.1 s `tiny` step on 2 CPU workers. At 0 every
            # parameter is partitioned and fetched in the forward pass's coalesced buckets instead (2 calls).
            # The same values are computed either way. NCCL's small collectives are cheap: GPUs keep the default.
            **({} if plan.use_gpu else {"stage3_param_persistence_threshold": 0}),
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": plan.learning_rate,
                "betas": list(plan.betas),
                "eps": plan.eps,
                "weight_decay": plan.weight_decay,
                # DeepSpeed's fused/CPU Adam kernels need CUDA or a compiled op; torch's AdamW is exact everywhere.
                "torch_adam": not plan.use_gpu,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": plan.max_steps,
                "warmup_num_steps": max(1, plan.warmup_steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": plan.min_lr_ratio,
            },
        },
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on 2-D weights only. Under ZeRO-3 a parameter's local tensor is a flat shard, so its true
    shape is ``ds_shape``."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields the tied embedding once
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _CheckpointedBlock(Block):
    """A :class:`Block` whose call, in training with grad enabled, stores only its input and recomputes the rest in
    backward. The recomputation goes through ``Module.__call__`` again, so ZeRO-3's hooks gather the partitioned
    parameters for it exactly as for the first forward. Parameter names do not change."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def apply_activation_checkpointing(model: GPT) -> GPT:
    """Recompute every transformer block in backward instead of keeping its activations (memory for compute)."""
    for block in model.transformer.h:
        if type(block) is Block:
            block.__class__ = _CheckpointedBlock
    return model


def build_model(plan: TrainPlan, ds_config: dict[str, Any], rank: int) -> GPT:
    """The plan's model, partitioned from the start: built under ``zero.Init`` (a large preset never exists whole
    on one rank), then initialized one module at a time through ``GatheredParameters`` (GPT-2 init, or the
    weights of ``plan.init_export``, read on rank 0 only)."""
    import deepspeed

    from pipeline.export.format import load_export

    config = GPTConfig.from_dict(plan.model)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = GPT(config)
    source = load_export(plan.init_export)[0].state_dict() if plan.init_export and rank == 0 else None
    torch.manual_seed(plan.seed)
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0):
            if rank != 0:
                continue
            if source is None:
                model.init_module(name, module)
            else:
                for pname, param in own:
                    param.data.copy_(source[f"{name}.{pname}"].to(param.dtype))
    if plan.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def weights_only_loads() -> None:
    """Make every ``torch.load`` in this process weights-only, DeepSpeed's included.

    DeepSpeed 0.19 reads its checkpoints (``engine.load_checkpoint``, ``zero_to_fp32``) with
    ``torch.load(..., weights_only=False)``: a full unpickle, so whoever can write to the run dir could run code on
    the workers. ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that argument; a ZeRO checkpoint holds only tensors,
    plain containers and two plain DeepSpeed classes, which are allowed here by name.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals([ZeroStageEnum, LossScaler])
