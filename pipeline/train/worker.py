"""The function every Ray Train worker runs: one DeepSpeed ZeRO-3 rank.

The loop reads: build the engine (:mod:`.deepspeed`), restore (:mod:`.checkpoint`), then per step take this rank's
micro-batches (:mod:`.batches`), step, log the metrics (:mod:`.metrics`), evaluate (:mod:`.evaluate`, and the
lm-eval tasks of :mod:`.task_eval`) and checkpoint. A step whose loss, gradient norm or validation loss is not
finite, or whose weights give a non-finite loss on the next batch, diverged (:func:`divergence`): every rank stops
before checkpointing it, and the loop returns the divergence for the driver to report. DeepSpeed is imported here,
inside the worker, never on the driver (ray #50406).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from pipeline.layout import RunLayout
from pipeline.model.gpt import GPTConfig, flops_per_token
from pipeline.train import checkpoint
from pipeline.train.batches import IGNORE, batches_for
from pipeline.train.deepspeed import build_model, deepspeed_config, param_groups, weights_only_loads
from pipeline.train.evaluate import all_reduce_sum, validation_loss
from pipeline.train.metrics import MetricsLog, measure_peak_flops
from pipeline.train.plan import TrainPlan
from pipeline.train.task_eval import TaskEvaluator


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist

    # torch.distributed's deprecation notices (raised inside DeepSpeed) would repeat on every step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    plan = TrainPlan.from_json(loop_config["plan"])
    stop_at = int(loop_config["stop_at"])  # absolute, fixed by the driver once per invocation
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if plan.use_gpu else torch.device("cpu")
    torch.manual_seed(plan.seed)

    weights_only_loads()
    deepspeed.init_distributed(dist_backend="nccl" if plan.use_gpu else "gloo")  # adopts Ray's process group
    ds_config = deepspeed_config(plan)
    model = build_model(plan, ds_config, rank)
    local_numel = sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())
    total_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, plan.weight_decay), config=ds_config
    )
    batches = batches_for(plan, rank, world)
    model_config = GPTConfig.from_dict(plan.model)

    live_metrics = rank == 0 and not storage.is_remote(plan.run_dir)  # remote runs get them through checkpoints
    log = MetricsLog(Path(RunLayout(plan.run_dir).metrics_file(plan.stage)) if live_metrics else None)
    step, consumed, tokens_seen = checkpoint.restore(engine, plan, log)

    node_ids: list[str | None] = [None] * world
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    shard_sizes = [0.0] * world
    shard_sizes[rank] = float(local_numel)
    shard_sizes = all_reduce_sum(shard_sizes, device)
    peak_flops = (plan.peak_tflops * 1e12) if plan.peak_tflops else measure_peak_flops(device) if rank == 0 else 0.0
    token_flops = flops_per_token(model_config, plan.context_length)
    progress = loop_config.get("progress") if rank == 0 else None  # the driver's ProgressBoard
    last_val: dict[str, float] = {}
    tasks = TaskEvaluator(plan, engine, rank, world, device) if plan.eval_tasks else None

    diverged: dict[str, Any] | None = None
    while step < stop_at:
        engine.train()
        started = time.perf_counter()
        loss_sum, loss_count = 0.0, 0
        for micro in range(plan.grad_accum):
            inputs, targets = batches.micro_batch(consumed, micro)
            output = engine(inputs.to(device), targets.to(device), loss_chunk_rows=plan.loss_chunk_rows)
            engine.backward(output.loss)
            engine.step()
            count = int((targets != IGNORE).sum())
            if count:  # a micro-batch without targets has a NaN mean loss that carries no information
                loss_sum += float(output.loss.detach()) * count
            loss_count += count
        local_norm = _float(engine.get_global_grad_norm())
        # all-reduced, so every rank sees the same values and takes the same divergence decision below
        loss_sum, loss_count, norm_sum, norms = all_reduce_sum(
            [loss_sum, float(loss_count), local_norm or 0.0, float(local_norm is not None)], device
        )
        step += 1
        consumed += plan.global_batch
        tokens_seen += int(loss_count)
        elapsed = time.perf_counter() - started
        tokens_per_s = plan.tokens_per_step / elapsed
        row: dict[str, Any] = {
            "step": step,
            "tokens": tokens_seen,
            "loss": loss_sum / max(loss_count, 1.0),
            "lr": float(engine.get_lr()[0]),
            "grad_norm": norm_sum / norms if norms else None,  # ZeRO's global norm: the same on every rank
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
            "mfu": token_flops * tokens_per_s / (peak_flops * world) if peak_flops else None,
        }
        if step % plan.eval_every == 0 or step == plan.max_steps:
            last_val = validation_loss(engine, batches, device, plan.loss_chunk_rows)
            if tasks is not None:
                last_val.update(tasks.scores())
            row.update(last_val)
        log.append(row)
        if progress is not None:
            progress.update.remote({"step": step, "loss": row["loss"], "tokens_per_s": tokens_per_s})
        checkpoint_due = step % plan.checkpoint_every == 0 or step == stop_at
        diverged = divergence(
            row, next_loss(engine, batches, consumed, device, plan.loss_chunk_rows) if checkpoint_due else None
        )
        if diverged is not None:
            if rank == 0:
                print(f"raygpt {plan.stage}: diverged at step {step}: {diverged['what']} is {diverged['value']}")
            break
        if checkpoint_due:
            report = {
                "step": step,
                "loss": row["loss"],
                "tokens": tokens_seen,
                **last_val,
                "shard_numel": shard_sizes,
                "total_numel": total_numel,
                "world_size": world,
                "node_ids": node_ids,
            }
            position = {"step": step, "consumed": consumed, "tokens_seen": tokens_seen}
            checkpoint.save(engine, plan, rank, position, log, report)
    dist.barrier()
    # Ray Train hands rank 0's return value to the driver, which fails the run with it (a deterministic divergence
    # is not raised here: Ray Train would retry a raised error up to train.max_failures times)
    return {"diverged": diverged} if diverged is not None else None


def divergence(row: dict[str, Any], next_loss: float | None) -> dict[str, Any] | None:
    """Why the step logged as ``row`` diverged, or None: its loss, gradient norm or validation loss is not finite,
    or (``next_loss``, measured before a checkpoint) the weights it produced give a non-finite loss. Every value
    is all-reduced, so all ranks decide alike and none is left waiting in a collective."""
    checks = [
        ("loss", row["loss"]),
        ("gradient norm", row.get("grad_norm")),
        ("validation loss", row.get("val_loss")),
        ("the loss of the weights it produced (on the next batch)", next_loss),
    ]
    for what, value in checks:
        if value is not None and not math.isfinite(value):
            return {"step": row["step"], "what": what, "value": str(value)}
    return None


def next_loss(
    engine: Any, batches: Any, consumed: int, device: torch.device, loss_chunk_rows: int | None = None
) -> float:
    """Mean loss (all ranks) of the current weights on the next step's first micro-batch, in eval mode without
    gradients: finite weights can still be poisoned (large enough to overflow the next forward pass), and a
    checkpoint of them would be no good one to resume from. Costs one forward pass per checkpoint."""
    engine.eval()
    with torch.no_grad():
        inputs, targets = batches.micro_batch(consumed, 0)
        output = engine(inputs.to(device), targets.to(device), loss_chunk_rows=loss_chunk_rows)
    count = int((targets != IGNORE).sum())
    total, count_all = all_reduce_sum([float(output.loss) * count if count else 0.0, float(count)], device)
    engine.train()
    return total / count_all if count_all else 0.0


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
