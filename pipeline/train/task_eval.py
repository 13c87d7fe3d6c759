"""lm-eval tasks scored inside training (``train.eval_tasks``), every ``eval_every`` steps, on the weights as they
are: no export, no second copy of the model.

Under ZeRO-3 every forward pass gathers parameter shards from all ranks, so every rank must run the same number
of forward passes. Every rank runs lm-eval alike (same documents, same requests, in the same order); the scoring
pairs are split into one contiguous share per rank, each rank scores its share in micro-batches, a rank with fewer
batches than the busiest runs one-token forwards to match, and the scores are gathered back in order. lm-eval
sees one process (rank 0 of 1): it neither splits nor gathers itself.

Only log-likelihood tasks (``loglikelihood``, ``multiple_choice``, ``loglikelihood_rolling``) are scored here;
a task that generates text is refused on the driver (:func:`check_tasks`) before any worker starts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SCORED_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
PREFIX = "lm_eval"  # metrics.jsonl keys: lm_eval/<task>/<metric>


def check_tasks(names: list[str]) -> None:
    """Raise ValueError unless lm-eval is installed and every task exists and scores log-likelihoods."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("train.eval_tasks needs lm-eval: pip install 'raygpt[eval]'") from None
    from pipeline.eval.run import EvalError, load_tasks

    with tempfile.TemporaryDirectory(prefix="raygpt-tasks-") as include:
        try:
            names, manager = load_tasks(names, Path(include))
        except EvalError as exc:
            raise ValueError(str(exc).replace("eval.tasks", "train.eval_tasks")) from None
        for name, task in manager.load(names)["tasks"].items():
            kind = task.get_config("output_type")
            if kind not in SCORED_TYPES:
                raise ValueError(
                    f"train.eval_tasks: {name} is a {kind} task; in-training evaluation scores log-likelihood "
                    f"tasks only ({', '.join(SCORED_TYPES)}): evaluate it on the export with `raygpt eval`"
                )


class ShardedScorer:
    """Scores (tokens, n) pairs with a DeepSpeed engine, the work split across the ranks of the process group."""

    def __init__(self, engine: Any, rank: int, world: int, device: torch.device, batch_size: int) -> None:
        self.engine, self.rank, self.world, self.device, self.batch_size = engine, rank, world, device, batch_size

    def score(self, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        import torch.distributed as dist

        from pipeline.eval.lm import score_pairs

        share = math.ceil(len(requests) / self.world)
        mine = requests[self.rank * share : (self.rank + 1) * share]
        batches = math.ceil(share / self.batch_size)  # the busiest rank's; all ranks run this many forwards
        self.engine.eval()
        scored = score_pairs(self.engine, mine, self.batch_size, self.device)
        with torch.no_grad():
            for _ in range(batches - math.ceil(len(mine) / self.batch_size)):
                self.engine(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, scored)
        self.engine.train()
        return [pair for part in gathered for pair in part]

    def generate(self, requests: list[Any]) -> list[str]:
        raise ValueError("in-training evaluation scores log-likelihood tasks only")


class TaskEvaluator:
    """The configured tasks, ready to score the engine's current weights; built once per worker."""

    def __init__(self, plan: Any, engine: Any, rank: int, world: int, device: torch.device) -> None:
        from pipeline.eval.lm import TokenScoringLM
        from pipeline.eval.run import load_tasks
        from pipeline.model.tokenizer import get_tokenizer

        self._include = tempfile.TemporaryDirectory(prefix="raygpt-tasks-")
        self.tasks, self.manager = load_tasks(list(plan.eval_tasks), Path(self._include.name))
        self.limit = plan.eval_task_limit
        self.seed = plan.seed
        tokenizer = get_tokenizer(plan.tokenizer.get("name", "r50k_base"), plan.tokenizer_file)
        scorer = ShardedScorer(engine, rank, world, device, plan.micro_batch_size)
        self.lm = TokenScoringLM(tokenizer, int(plan.model["context_length"]), [scorer])

    def scores(self) -> dict[str, float]:
        """``lm_eval/<task>/<metric>``: every numeric metric (no standard errors) of every task."""
        import lm_eval

        with quiet():
            out = lm_eval.simple_evaluate(
                model=self.lm,
                tasks=self.tasks,
                task_manager=self.manager,
                num_fewshot=None,  # the task's own (0 unless its YAML sets num_fewshot)
                limit=self.limit,
                log_samples=False,
                bootstrap_iters=0,
                # the process's own generators are training's: lm-eval must not reseed them mid-run
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                fewshot_random_seed=self.seed,
            )
        flat: dict[str, float] = {}
        for task, metrics in (out or {}).get("results", {}).items():
            for key, value in metrics.items():
                if isinstance(value, int | float) and "stderr" not in key:
                    flat[f"{PREFIX}/{task}/{key.split(',')[0]}"] = float(value)
        return flat


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """lm-eval's info logs and progress bars (on stderr) stay out of the training console; warnings still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
