"""What one training run does, resolved on the driver before any worker starts, and its DeepSpeed config.

The plan is a plain, JSON-serializable record: the driver validates the config against the data manifest and
the model, derives the batch geometry (micro-batch x accumulation x workers), and ships the plan to the Ray
Train workers. ``deepspeed_config`` turns it into the ZeRO-3 config DeepSpeed consumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Stage = Literal["pretrain", "finetune"]


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
    peak_tflops: float | None = None
    init_export: str | None = None  # weights to start from (fine-tuning)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    tokenizer: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""  # the dataset manifest's fingerprint
    init_fingerprint: str = ""  # sha256 of the weights fine-tuning starts from

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
        return cls(**data)

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and the run that resumes from it."""
        return {
            "stage": self.stage,
            "model": self.model,
            "num_workers": self.num_workers,  # ZeRO-3 shards are per rank (DeepSpeed #5405)
            "context_length": self.context_length,
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
