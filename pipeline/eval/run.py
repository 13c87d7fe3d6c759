"""``raygpt eval``: lm-eval tasks at several numbers of shots, against an export (scored on Ray actors by the
registered ``raygpt`` model) or through an OpenAI-compatible endpoint (lm-eval's ``local-completions`` with the
remote tokenizer it detects).

Results land in ``<run.dir>/eval/``: ``results.json`` (every task's metrics per number of shots, and how they were
obtained), lm-eval's own output per number of shots (``lm_eval_<k>shot.json``) and ``shots.png``, each task's
score against the number of in-context examples (GPT-3's Figure 1.2).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.layout import RunLayout, resolve_export

# the score plotted and summarized per task: the first of these that the task reports
HEADLINE = ("acc,none", "exact_match,none", "bits_per_byte,none", "perplexity,none")


class EvalError(ValueError):
    """An evaluation the user asked for cannot run (no export, unknown task, unreachable endpoint)."""


def load_tasks(requested: list[str], include: Path) -> tuple[list[str], Any]:
    """Task names and the lm-eval TaskManager that knows them: the shipped tasks (written into ``include``),
    every registry task, and the tasks of the YAML files named (their folders join the include path). No names:
    the shipped tasks."""
    import yaml
    from lm_eval.tasks import TaskManager

    from pipeline.eval.tasks import TASKS, write_task_dir

    paths, names = [str(write_task_dir(include))], []
    for name in requested or sorted(TASKS):
        if name.endswith((".yaml", ".yml")):
            file = Path(name)
            if not file.is_file():
                raise EvalError(f"eval.tasks: task file {name!r} does not exist")
            task = (yaml.safe_load(file.read_text()) or {}).get("task")
            if not isinstance(task, str):
                raise EvalError(f"eval.tasks: {name!r} names no task ('task:' key)")
            paths.append(str(file.resolve().parent))
            names.append(task)
        else:
            names.append(name)
    manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvalError(f"eval.tasks: unknown lm-eval task(s) {', '.join(unknown)}")
    return names, manager


def _endpoint_model(config: PipelineConfig, endpoint: str) -> tuple[str, str]:
    base = endpoint.rstrip("/").removesuffix("/v1")
    key = config.serve.resolved_api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        request = urllib.request.Request(f"{base}/v1/models", headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            card = json.loads(response.read())["data"][0]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise EvalError(f"eval.endpoint: cannot read {base}/v1/models ({exc})") from None
    if key:
        os.environ["OPENAI_API_KEY"] = key  # where lm-eval's local-completions reads the bearer key
    args = f"model={card['id']},base_url={base}/v1/completions,max_length={card['max_model_len']},num_concurrent=4"
    return "local-completions", args


def evaluate(config: PipelineConfig, export: str | None = None, endpoint: str | None = None) -> dict[str, Any]:
    """Run every task at every number of shots; returns the summary written to ``<run.dir>/eval/results.json``."""
    import lm_eval

    import pipeline.eval.lm  # noqa: F401  (registers the raygpt model)

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tasks are local files or already cached: never download
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    e = config.eval
    endpoint = endpoint or e.endpoint
    if endpoint:
        model, model_args, source = *_endpoint_model(config, endpoint), endpoint
    else:
        if e.num_workers > 1:
            from pipeline.raycluster import connect

            connect(config.run)
        source = resolve_export(config, export)
        model = "raygpt"
        model_args = f"export={source},num_workers={e.num_workers}"
        if config.data.tokenizer_file:
            model_args += f",tokenizer_file={config.data.tokenizer_file}"
    layout = RunLayout.of(config)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raygpt-eval-") as include:
        tasks, manager = load_tasks(config.eval.tasks, Path(include))
        # one model for every number of shots: the export is loaded (and its actors started) once
        lm = lm_eval.api.registry.get_model(model).create_from_arg_string(model_args, {"batch_size": e.batch_size})
        try:
            with _bootstrap_in_process():
                scores = _score_shots(config, lm, tasks, manager, layout)
        finally:
            if hasattr(lm, "close"):
                lm.close()
    summary = {
        "source": source,
        "model": model,
        "shots": e.shots,
        "limit": e.limit,
        "seconds": round(time.perf_counter() - started, 1),
        "headline": {task: headline(per_shot) for task, per_shot in scores.items()},
        "scores": scores,
    }
    summary["plot"] = storage.join(layout.eval_dir, "shots.png")
    storage.write_bytes(summary["plot"], plot_shots(summary["headline"], f"raygpt eval: {Path(source).name}"))
    summary["results"] = storage.join(layout.eval_dir, "results.json")
    storage.write_bytes(summary["results"], (json.dumps(summary, indent=2) + "\n").encode())
    return summary


@contextlib.contextmanager
def _bootstrap_in_process() -> Iterator[None]:
    """lm-eval's bootstrap standard errors run in this process instead of a forked ``multiprocessing`` pool.

    This process runs Ray's and gRPC's threads (a Ray driver, an HTTP client pool); a child forked from it can
    start with one of their locks held and never exit, and lm-eval then waits on it forever. The in-process
    loop draws the same resamples (one seeded RNG per chunk of 1,000), so the errors are the same numbers.
    """
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # the switch lm-eval's bootstrap_stderr reads
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def _score_shots(
    config: PipelineConfig, lm: Any, tasks: list[str], manager: Any, layout: RunLayout
) -> dict[str, dict[str, dict[str, float]]]:
    """Every task at every number of shots on one lm-eval model; lm-eval's own output lands per number of shots."""
    import lm_eval

    e, seed = config.eval, config.run.seed
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for shots in e.shots:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=shots,
            limit=e.limit,
            task_manager=manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        if out is None:  # lm-eval returns None on non-zero ranks only
            raise EvalError("lm-eval returned no results")
        raw = json.dumps(out, indent=1, default=str).encode()
        storage.write_bytes(storage.join(layout.eval_dir, f"lm_eval_{shots}shot.json"), raw)
        for task, metrics in out["results"].items():
            numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and "stderr" not in k}
            scores.setdefault(task, {})[str(shots)] = numbers
    return scores


def headline(per_shot: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The task's headline metric and its value per number of shots."""
    first = next(iter(per_shot.values()))
    metric = next((m for m in HEADLINE if m in first), next(iter(first), ""))
    return {"metric": metric.split(",")[0], "by_shots": {k: v.get(metric) for k, v in per_shot.items()}}


SCORES_IN_UNIT = ("acc", "acc_norm", "exact_match", "f1", "mcc")  # plotted on their own 0-1 axis


def plot_shots(headlines: dict[str, dict[str, Any]], title: str) -> bytes:
    """A PNG of each task's headline score against the number of in-context examples: scores between 0 and 1
    (accuracy, exact match) on the left, the rest (perplexity, bits per byte) on the right."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = {t: h for t, h in headlines.items() if h["metric"] in SCORES_IN_UNIT}
    other = {t: h for t, h in headlines.items() if h["metric"] not in SCORES_IN_UNIT}
    panels = [(group, label) for group, label in ((unit, "score"), (other, "value")) if group]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), dpi=110, squeeze=False)
    for ax, (group, label) in zip(axes[0], panels, strict=True):
        shots: set[int] = set()
        for task, head in sorted(group.items()):
            keys = sorted(head["by_shots"], key=int)
            shots.update(int(k) for k in keys)
            values = [head["by_shots"][k] for k in keys]
            ax.plot([int(k) for k in keys], values, "o-", label=f"{task} ({head['metric']})")
        if group is unit:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(sorted(shots))
        ax.set_xlabel("examples in context (shots)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def summary_line(summary: dict[str, Any]) -> str:
    parts = []
    for task, head in sorted(summary["headline"].items()):
        values = " / ".join(f"{v:.3f}" if v is not None else "n/a" for v in head["by_shots"].values())
        parts.append(f"{task} {head['metric']} {values}")
    shots = "/".join(str(k) for k in summary["shots"])
    return f"{shots}-shot: " + "; ".join(parts)
