"""Train-stage benchmark (not a test): raygpt's Ray Train + DeepSpeed ZeRO-3 step against a plain PyTorch loop.

All figures come from one run on one machine, so only ratios are compared:

* tokens/s of raygpt's training step with 1 worker, fused LM-head loss (the default) vs the same step computing
  the full logits and ``F.cross_entropy`` (``train.loss_chunk_rows=null``; target >= 1.3x);
* the 1-worker step vs a plain single-process PyTorch loop with the same model, loss, micro-batch, optimizer
  (AdamW, GPT-3 betas, clipping) and thread count (target >= 0.95), and that plain loop on full logits;
* the same ZeRO-3 step in one plain process (DeepSpeed with a world of one, no Ray), which tells DeepSpeed's
  share of that gap from Ray Train's;
* tokens/s with 2 workers vs 1 worker (target >= 1.8x on 2 cores), beside what two cores give with no
  communication at all: two plain loops run at once in two processes;
* MFU against the fp32 matmul peak of one thread measured in the same run.

Usage: ``python -m bench.train [--steps 40] [--preset tiny]``; results: bench/results/train.json -> bench/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ``python bench/train.py`` puts bench/ first on sys.path, where bench/tokenize.py would shadow the standard
# library's tokenize module (torch imports it): swap that entry for the repository root (for ``bench.report``).
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [str(_BENCH.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _BENCH]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from bench.report import Headline, save_fragment  # noqa: E402

WARMUP_STEPS = 5


def plain_pytorch(
    preset: str, context: int, micro_batch: int, steps: int, lr: float, loss_chunk_rows: int | None
) -> float:
    """Median tokens/s of a plain single-process loop (one thread, like one Ray worker with one CPU)."""
    from pipeline.model.gpt import GPT
    from pipeline.model.presets import PRESETS
    from pipeline.train.deepspeed import param_groups

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(PRESETS[preset].model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    batch = torch.randint(0, 50257, (micro_batch, context + 1))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(batch[:, :-1], batch[:, 1:], loss_chunk_rows=loss_chunk_rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return micro_batch * context / statistics.median(times[WARMUP_STEPS:])


def plain_pytorch_pair(
    preset: str, context: int, micro_batch: int, steps: int, lr: float, loss_chunk_rows: int | None
) -> float:
    """Summed tokens/s of two plain loops run at once in two processes, one thread each: what two workers could
    reach on two cores if their step needed no communication and nothing else ran."""
    return sum(_in_fresh_processes(plain_pytorch, (preset, context, micro_batch, steps, lr, loss_chunk_rows), 2))


def zero3_one_process(
    preset: str, context: int, micro_batch: int, steps: int, lr: float, loss_chunk_rows: int | None
) -> float:
    """Median tokens/s of raygpt's ZeRO-3 model and DeepSpeed config (:mod:`pipeline.train.deepspeed`) stepped in a
    fresh process of its own, world size 1 over gloo, one thread: the training step without Ray Train."""
    (tokens_per_s,) = _in_fresh_processes(_zero3_loop, (preset, context, micro_batch, steps, lr, loss_chunk_rows), 1)
    return tokens_per_s


def _in_fresh_processes(loop: Callable[..., float], args: tuple[Any, ...], processes: int) -> list[float]:
    """``loop(*args)`` in ``processes`` spawned processes at once (none inherits this one's threads or state)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.starmap(loop, [args] * processes)


def _zero3_loop(
    preset: str, context: int, micro_batch: int, steps: int, lr: float, loss_chunk_rows: int | None
) -> float:
    import os
    import socket

    import deepspeed

    from pipeline.model.presets import PRESETS
    from pipeline.train.deepspeed import build_model, deepspeed_config, param_groups
    from pipeline.train.plan import TrainPlan

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    plan = TrainPlan(
        stage="pretrain",
        model=PRESETS[preset].model.to_dict(),
        data_dir="",
        run_dir="",
        max_steps=steps,
        micro_batch_size=micro_batch,
        grad_accum=1,
        num_workers=1,
        context_length=context,
        learning_rate=lr,
        min_lr_ratio=0.1,
        warmup_steps=1,
        weight_decay=0.1,
        grad_clip=1.0,
        checkpoint_every=steps,
        eval_every=steps,
        eval_batches=1,
        seed=0,
        use_gpu=False,
        activation_checkpointing=False,
        loss_chunk_rows=loss_chunk_rows,
    )
    config = deepspeed_config(plan)
    model = build_model(plan, config, rank=0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=config)
    batch = torch.randint(0, 50257, (micro_batch, context + 1))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        output = engine(batch[:, :-1], batch[:, 1:], loss_chunk_rows=loss_chunk_rows)
        engine.backward(output.loss)
        engine.step()
        float(output.loss.detach())
        times.append(time.perf_counter() - started)
    return micro_batch * context / statistics.median(times[WARMUP_STEPS:])


def raygpt_run(
    run_dir: Path, workers: int, preset: str, context: int, micro_batch: int, steps: int, loss_chunk_rows: int | None
) -> dict:
    from pipeline.config import load_config
    from pipeline.layout import RunLayout
    from pipeline.train.driver import pretrain

    config = load_config(
        overrides=[
            f"run.dir={run_dir}",
            f"run.name=bench-{workers}w-{loss_chunk_rows}",
            f"model.preset={preset}",
            f"data.context_length={context}",
            f"train.num_workers={workers}",
            f"train.micro_batch_size={micro_batch}",
            f"train.batch_tokens={micro_batch * workers * context}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}",
            f"train.eval_every={steps}",
            "train.eval_batches=1",
            "train.max_failures=0",
            f"train.loss_chunk_rows={'null' if loss_chunk_rows is None else loss_chunk_rows}",
        ]
    )
    pretrain(config, fresh=True)
    metrics = Path(RunLayout.of(config).metrics_file("pretrain"))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = rows[WARMUP_STEPS:-1]  # the last step also evaluates
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["mfu"] for r in timed if r["mfu"] is not None),
    }


def matmul_peak() -> float:
    from pipeline.train.metrics import measure_peak_flops

    torch.set_num_threads(1)
    return max(measure_peak_flops(torch.device("cpu")) for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.data.build import tokenize_corpus

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    root = Path(tempfile.mkdtemp(prefix="raygpt-bench-train-"))
    tokenize_corpus(load_config(overrides=[f"run.dir={root}", f"data.context_length={args.context}"]))

    peak = matmul_peak()
    chunk = load_config().train.loss_chunk_rows
    plain_full = plain_pytorch(args.preset, args.context, args.micro_batch, args.steps, 2e-3, None)
    plain = plain_pytorch(args.preset, args.context, args.micro_batch, args.steps, 2e-3, chunk)
    pair = plain_pytorch_pair(args.preset, args.context, args.micro_batch, args.steps, 2e-3, chunk)
    bare = zero3_one_process(args.preset, args.context, args.micro_batch, args.steps, 2e-3, chunk)
    full = raygpt_run(root, 1, args.preset, args.context, args.micro_batch, args.steps, None)
    one = raygpt_run(root, 1, args.preset, args.context, args.micro_batch, args.steps, chunk)
    two = raygpt_run(root, 2, args.preset, args.context, args.micro_batch, args.steps, chunk)
    from pipeline.model.gpt import flops_per_token
    from pipeline.model.presets import PRESETS

    fpt = flops_per_token(PRESETS[args.preset].model, args.context)
    one_tps, two_tps, full_tps = one["tokens_per_s"], two["tokens_per_s"], full["tokens_per_s"]
    rows = [
        ("plain PyTorch loop, full logits + F.cross_entropy", plain_full, fpt * plain_full / peak, ""),
        (f"plain PyTorch loop, fused loss ({chunk} rows a chunk)", plain, fpt * plain / peak, "baseline"),
        ("two plain loops at once, fused loss (2 processes)", pair, fpt * pair / (2 * peak), ""),
        ("raygpt's ZeRO-3 step in one process, no Ray (world 1)", bare, fpt * bare / peak, ""),
        ("raygpt ZeRO-3, 1 worker, full logits", full_tps, fpt * full_tps / peak, ""),
        ("raygpt ZeRO-3, 1 worker, fused loss", one_tps, fpt * one_tps / peak, ""),
        ("raygpt ZeRO-3, 2 workers, fused loss", two_tps, fpt * two_tps / (2 * peak), ""),
    ]
    ratios = [
        f"{plain_full / plain:.2f}x of the fused plain loop",
        "baseline",
        f"{pair / plain:.2f}x of one plain loop (the 2-core ceiling)",
        f"{bare / plain:.2f}x of the plain loop (DeepSpeed's share of the gap)",
        f"{full_tps / plain:.2f}x of the fused plain loop",
        f"{one_tps / full_tps:.2f}x of full logits (target >= 1.3); {one_tps / plain:.2f}x of the plain loop "
        f"(target >= 0.95); {one_tps / bare:.2f}x of the same step without Ray",
        f"{two_tps / one_tps:.2f}x of 1 worker (target >= 1.8); {two_tps / pair:.2f}x of two plain loops",
    ]
    section = [
        f"Model `{args.preset}`, micro-batch {args.micro_batch} x {args.context} tokens per worker, fp32, median "
        f"over steps {WARMUP_STEPS + 1}..{args.steps - 1}; fp32 matmul peak of one thread measured in the same run: "
        f"{peak / 1e9:.1f} GFLOP/s.",
        "",
        "| setup | tokens/s | MFU (vs measured fp32 peak per worker) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for (name, tps, mfu, _), ratio in zip(rows, ratios, strict=True):
        section.append(f"| {name} | {tps:,.0f} | {mfu:.1%} | {ratio} |")
    text = "\n".join(section)
    print(text)
    if args.no_write:
        return
    headlines = [
        Headline(
            "ZeRO-3 step, 1 worker: fused loss vs full logits",
            f"{one_tps:,.0f} tok/s",
            f"full logits {full_tps:,.0f} tok/s",
            one_tps / full_tps,
            1.3,
        ),
        Headline(
            "ZeRO-3 step, 1 worker vs plain loop",
            f"{one_tps:,.0f} tok/s",
            f"plain PyTorch loop {plain:,.0f} tok/s",
            one_tps / plain,
            0.95,
        ),
        Headline("2 workers vs 1", f"{two_tps:,.0f} tok/s", f"1 worker {one_tps:,.0f} tok/s", two_tps / one_tps, 1.8),
        Headline(
            "ZeRO-3 step in one process (no Ray) vs plain loop",
            f"{bare:,.0f} tok/s",
            f"plain PyTorch loop {plain:,.0f} tok/s",
            bare / plain,
        ),
        Headline(
            "two plain loops at once vs one (2-core ceiling)",
            f"{pair:,.0f} tok/s",
            f"one plain loop {plain:,.0f} tok/s",
            pair / plain,
        ),
        Headline(
            "MFU, 1 worker",
            f"{fpt * one_tps / 1e9:.1f} GFLOP/s",
            f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s",
            fpt * one_tps / peak,
        ),
    ]
    command = f"python -m bench.train --steps {args.steps} --preset {args.preset}"
    print(f"wrote {save_fragment('train', command, text, headlines)}")


if __name__ == "__main__":
    main()
