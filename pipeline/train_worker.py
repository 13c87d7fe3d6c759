"""The function every Ray Train worker runs: one DeepSpeed ZeRO-3 rank.

DeepSpeed is imported here, inside the worker, never on the driver (ray #50406). The model is built under
``deepspeed.zero.Init`` so a large preset never exists whole on one rank; weights are then initialized (GPT-2
init, or copied from an export for fine-tuning) one module at a time through ``GatheredParameters``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.data_order import ChunkedReader, SequenceOrder
from pipeline.model import GPT, GPTConfig
from pipeline.train_metrics import MetricsLog, measure_peak_flops
from pipeline.train_plan import TrainPlan, deepspeed_config

STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
IGNORE = -100


class Batches:
    """One rank's micro-batches from a dataset's train split, in the resumable order, and its share of the
    evaluation split. Subclasses open the stores and turn rows into (inputs, targets)."""

    train_split, eval_split = "train", "val"

    def __init__(self, plan: TrainPlan, rank: int, world: int) -> None:
        from pipeline.data.reader import load_manifest

        manifest = load_manifest(plan.data_dir)
        self.plan, self.rank, self.world = plan, rank, world
        self.train = self.open(manifest, self.train_split)
        self.val = self.open(manifest, self.eval_split)
        self.order = SequenceOrder(len(self.train), plan.seed)
        self.reader = ChunkedReader(self.train, self.order.chunk, cache_chunks=self.order.window + 1)

    def open(self, manifest: Any, split: str) -> Any:
        raise NotImplementedError

    def _tensors(self, rows: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def micro_batch(self, consumed: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        mb = self.plan.micro_batch_size
        start = SequenceOrder.micro_batch_start(consumed, micro_step, self.rank, self.world, mb)
        return self._tensors(self.reader.take(self.order.indices(start, mb)))

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.plan.micro_batch_size
        total = min(len(self.val), self.plan.eval_batches * mb * self.world)
        for start in range(self.rank * mb, total, self.world * mb):
            yield self._tensors(list(self.val.read(start, min(start + mb, total))))


class PretrainBatches(Batches):
    """Packed sequences: inputs are tokens[:-1], targets tokens[1:], every target counts."""

    def open(self, manifest: Any, split: str) -> Any:
        from pipeline.data.reader import SequenceStore

        return SequenceStore(manifest, split)

    def _tensors(self, rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]


class FinetuneBatches(Batches):
    """Variable-length prompt/completion examples, right-padded; loss only where the mask says so."""

    eval_split = "heldout"

    def __init__(self, plan: TrainPlan, rank: int, world: int) -> None:
        super().__init__(plan, rank, world)
        self.pad_id = int(plan.tokenizer.get("eot_id", 50256))

    def open(self, manifest: Any, split: str) -> Any:
        from pipeline.data.reader import FinetuneStore

        return FinetuneStore(manifest, split)

    def _tensors(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in examples) - 1
        inputs = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, (ids, mask) in enumerate(examples):
            ids_t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            keep = torch.from_numpy(np.asarray(mask, dtype=bool))[1:]
            n = len(ids_t) - 1
            inputs[row, :n] = ids_t[:-1]
            targets[row, :n] = torch.where(keep, ids_t[1:], torch.full_like(ids_t[1:], IGNORE))
        return inputs, targets


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on 2-D weights only. Under ZeRO-3 a parameter's local tensor is a flat shard, so its true
    shape is ``ds_shape``."""
    decay, no_decay = [], []
    for param in model.parameters():  # parameters() yields the tied embedding once
        shape = getattr(param, "ds_shape", param.shape)
        (decay if len(shape) >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(plan: TrainPlan, ds_config: dict[str, Any], rank: int) -> GPT:
    import deepspeed

    from pipeline.export import load_export

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
    model.gradient_checkpointing = plan.activation_checkpointing
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


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    # torch.distributed's deprecation notices (raised inside DeepSpeed) would repeat on every step
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    plan = TrainPlan.from_json(loop_config["plan"])
    stop_after = loop_config.get("stop_after_steps")
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
    batches = PretrainBatches(plan, rank, world) if plan.stage == "pretrain" else FinetuneBatches(plan, rank, world)
    model_config = GPTConfig.from_dict(plan.model)

    step, consumed, tokens_seen = 0, 0, 0
    live_metrics = rank == 0 and not storage.is_remote(plan.run_dir)  # remote runs get them through checkpoints
    log = MetricsLog(Path(plan.run_dir) / plan.stage / METRICS_FILE if live_metrics else None)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = json.loads((Path(directory) / STATE_FILE).read_text())
            if state["fingerprint"] != plan.fingerprint():
                raise RuntimeError(
                    f"the checkpoint in {directory} was made for {state['fingerprint']}, not {plan.fingerprint()}"
                )
            engine.load_checkpoint(directory, tag=state["tag"])
            step, consumed, tokens_seen = state["step"], state["consumed"], state["tokens_seen"]
            log.restore((Path(directory) / METRICS_FILE).read_text().splitlines(), upto_step=step)

    node_ids: list[str | None] = [None] * world
    dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
    shard_sizes = [0.0] * world
    shard_sizes[rank] = float(local_numel)
    shard_sizes = _all_reduce(shard_sizes, device)
    peak_flops = (plan.peak_tflops * 1e12) if plan.peak_tflops else measure_peak_flops(device) if rank == 0 else 0.0
    flops_per_token = _flops_per_token(model_config, plan.context_length)
    progress = _progress_bar(plan, step) if rank == 0 else None
    last_val: dict[str, float] = {}

    stop_at = min(plan.max_steps, step + stop_after) if stop_after else plan.max_steps
    while step < stop_at:
        engine.train()
        started = time.perf_counter()
        loss_sum, loss_count = 0.0, 0
        for micro in range(plan.grad_accum):
            inputs, targets = batches.micro_batch(consumed, micro)
            output = engine(inputs.to(device), targets.to(device))
            engine.backward(output.loss)
            engine.step()
            count = int((targets != IGNORE).sum())
            loss_sum += float(output.loss.detach()) * count
            loss_count += count
        loss_sum, loss_count = _all_reduce([loss_sum, float(loss_count)], device)
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
            "grad_norm": _float(engine.get_global_grad_norm()),
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed,
            "mfu": flops_per_token * tokens_per_s / (peak_flops * world) if peak_flops else None,
        }
        if step % plan.eval_every == 0 or step == plan.max_steps:
            last_val = evaluate(engine, batches, device)
            row.update(last_val)
        log.append(row)
        if progress is not None:
            progress.update(1)
            progress.set_description(f"{plan.stage} loss {row['loss']:.3f}")
        if step % plan.checkpoint_every == 0 or step == stop_at:
            with tempfile.TemporaryDirectory(prefix=f"raygpt-ckpt-{rank}-") as directory:
                tag = f"step{step}"
                engine.save_checkpoint(directory, tag=tag)
                if rank == 0:
                    state = {
                        "step": step,
                        "consumed": consumed,
                        "tokens_seen": tokens_seen,
                        "tag": tag,
                        "fingerprint": plan.fingerprint(),
                    }
                    (Path(directory) / STATE_FILE).write_text(json.dumps(state))
                    (Path(directory) / METRICS_FILE).write_text(log.text())
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
                ray.train.report(report, checkpoint=Checkpoint.from_directory(directory))
    if progress is not None:
        progress.close()
    dist.barrier()


def evaluate(engine: Any, batches: Batches, device: torch.device) -> dict[str, float]:
    """Validation loss (mean over target tokens, all ranks) and perplexity."""
    engine.eval()
    loss_sum, count = 0.0, 0.0
    with torch.no_grad():
        for inputs, targets in batches.eval_batches():
            output = engine(inputs.to(device), targets.to(device))
            n = int((targets != IGNORE).sum())
            loss_sum += float(output.loss) * n
            count += n
    loss_sum, count = _all_reduce([loss_sum, count], device)
    engine.train()
    if count == 0:
        return {}
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def _flops_per_token(config: GPTConfig, seq_len: int) -> int:
    from pipeline.model import flops_per_token

    return flops_per_token(config, seq_len)


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def _progress_bar(plan: TrainPlan, start: int) -> Any:
    try:
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:  # pragma: no cover - older Ray
        from tqdm import tqdm
    bar = tqdm(total=plan.max_steps, desc=plan.stage)
    if start:
        bar.update(start)
    return bar


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
