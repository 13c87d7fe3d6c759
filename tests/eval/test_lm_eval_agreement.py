"""lm-eval itself (not a re-implementation) scores raygpt's shipped tasks through ``raygpt serve`` with the remote
tokenizer it detects on its own (``local-completions``: only model, base_url and max_length), with its ``hf``
backend on the Hugging Face export of the same weights (no tokenizer argument), and with raygpt's registered
model class on the export directly (two Ray actors). Every per-item log-likelihood agrees and so does every
accuracy.

The model is a nano one whose next token is very often ``<|endoftext|>``: a completion that ends there is where
the endpoint's logprobs used to leave the generated token out, so that lm-eval, which drops the last entry as the
generated one (``token_logprobs[ctxlen:-1]``), lost the continuation's last token instead.

lm-eval reserves one token for generation on API models and windows rolling perplexity at ``max_length - 2``
tokens there, against ``max_length`` on ``hf``: the ``hf`` run gets the endpoint's context minus 2 so that both
see the same windows and the same left-truncated contexts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.serve import deployed

from pipeline.eval.tasks import TASKS, write_task_dir
from pipeline.export.format import save_export
from pipeline.export.hf import export_hf
from pipeline.model.gpt import GPT
from pipeline.model.presets import PRESETS
from pipeline.model.tokenizer import get_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the shipped tasks are local files: never reach the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NANO = PRESETS["nano"].model
LIMIT = 24  # items per task
# no bootstrap standard errors: agreement is checked item by item, and lm-eval computes them in a pool forked from
# this process, a Ray driver, whose children can hang on a lock one of Ray's threads held
NO_BOOTSTRAP = 0


def eot_leaning_model() -> GPT:
    """Random nano weights, with the final layer norm's output pulled towards <|endoftext|>'s (tied) embedding, so
    that <|endoftext|> is the greedy next token after a good share of the continuations."""
    torch.manual_seed(7)
    model = GPT(NANO).eval()
    eot = get_tokenizer().eot_id
    with torch.no_grad():
        direction = torch.randn(NANO.d_model)
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[eot] = 0.1 * direction
    return model


def _per_item(results: dict[str, Any], task: str) -> dict[int, list[float]]:
    out = {}
    for sample in results["samples"][task]:
        values = [r[0] if isinstance(r, list | tuple) else r for r in sample["filtered_resps"]]
        out[sample["doc_id"]] = [float(v[0] if isinstance(v, list | tuple) else v) for v in values]
    return out


def test_lm_eval_agrees_through_the_endpoint_and_on_the_hf_export(tmp_path: Path, serve_port: int) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    export = save_export(eot_leaning_model(), NANO, tmp_path / "export", get_tokenizer().info(), metadata={})
    hf_dir = export_hf(str(export), tmp_path / "hf")
    tasks = sorted(TASKS)
    task_manager = TaskManager(include_path=str(write_task_dir(tmp_path / "tasks")))
    context = NANO.context_length

    hf = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32,max_length={context - 2}",
        tasks=tasks,
        task_manager=task_manager,
        limit=LIMIT,
        batch_size=8,
        device="cpu",
        log_samples=True,
        bootstrap_iters=NO_BOOTSTRAP,
    )
    with deployed(tmp_path, serve_port, str(export)) as url:
        api = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model=raygpt,base_url={url}/v1/completions,max_length={context},num_concurrent=4",
            tasks=tasks,
            task_manager=task_manager,
            limit=LIMIT,
            log_samples=True,
            bootstrap_iters=NO_BOOTSTRAP,
        )
    import pipeline.eval.lm  # noqa: F401  (registers the raygpt model with lm-eval)

    direct = lm_eval.simple_evaluate(
        model="raygpt",
        model_args=f"export={export},max_length={context - 2},num_workers=2,num_cpus=1",
        tasks=tasks,
        task_manager=task_manager,
        limit=LIMIT,
        log_samples=True,
        bootstrap_iters=NO_BOOTSTRAP,
    )
    assert hf is not None and api is not None and direct is not None

    for ours_run in (api, direct):  # the endpoint, and the export scored on Ray actors
        for task in tasks:
            ours, theirs = _per_item(ours_run, task), _per_item(hf, task)
            assert ours.keys() == theirs.keys() and len(ours) == LIMIT, task
            for doc_id in ours:
                tolerance = 1e-4 if task != "raygpt_ppl" else 1e-6 * abs(theirs[doc_id][0])  # sums of ~10^3 tokens
                assert ours[doc_id] == pytest.approx(theirs[doc_id], abs=tolerance), (task, doc_id)
            for metric in ("acc,none", "acc_norm,none"):
                if metric in hf["results"][task]:
                    assert ours_run["results"][task][metric] == hf["results"][task][metric], (task, metric)

    # the case that broke is common here: after many lambada continuations the greedy next token is <|endoftext|>
    model, tokenizer = eot_leaning_model(), get_tokenizer()
    ended = 0
    for sample in api["samples"]["raygpt_lambada"]:
        doc = sample["doc"]
        ids = tokenizer.encode(doc["context"] + " " + doc["target"])[-(context - 1) :]
        with torch.no_grad():
            ended += int(model(torch.tensor([ids])).logits[0, -1].argmax()) == tokenizer.eot_id
    assert ended >= LIMIT // 4, ended
