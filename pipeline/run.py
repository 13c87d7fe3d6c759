"""``raygpt run``: raw text to a served model in one command.

tokenize -> tokenize-finetune -> pretrain -> finetune -> export -> serve, on the built-in defaults (local Ray, 2 CPUs,
the sample corpus) or on ``--config cluster.yaml``. Each stage skips itself when its inputs and settings have not
changed, so a second run is quick. The run ends with one sample request through the endpoint and a summary,
printed and written to ``<run.dir>/summary.json``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.console import log_dir
from pipeline.layout import RunLayout

SAMPLE_PROMPT_INDEX = 0


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = round(time.perf_counter() - started, 1)


def sample_request(url: str, config: PipelineConfig, prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    """One completion through the HTTP endpoint, the way any OpenAI client would send it."""
    body = json.dumps(
        {"model": config.serve.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    ).encode()
    headers = {"Content-Type": "application/json"}
    key = config.serve.resolved_api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=config.serve.request_timeout_s) as response:
        return json.loads(response.read())


def run_pipeline(
    config: PipelineConfig, serve: bool = True, exit_after_sample: bool = False, fresh: bool = False
) -> dict[str, Any]:
    """The whole pipeline, holding the run dir's lock from the first stage until serving ends (a second run in
    the same run dir is refused: :mod:`pipeline.runlock`)."""
    from pipeline.runlock import run_lock

    if serve:
        from pipeline.serve.deploy import check_exposure

        check_exposure(config)  # before hours of training (and before the run dir is touched), not after
    with run_lock(config.run.dir, "run"):
        return _run_pipeline(config, serve, exit_after_sample, fresh)


def _run_pipeline(config: PipelineConfig, serve: bool, exit_after_sample: bool, fresh: bool) -> dict[str, Any]:
    from pipeline.data.build import tokenize_corpus
    from pipeline.data.finetune import tokenize_finetune
    from pipeline.data.reader import heldout_examples, load_manifest
    from pipeline.raycluster import connect
    from pipeline.train.driver import finetune, pretrain

    connect(config.run, config.serve)  # a local Ray starts in the mode its endpoint will serve in
    timings: dict[str, float] = {}
    started_all = time.perf_counter()

    started = time.perf_counter()
    # the run owns its datasets: changed inputs or settings rebuild them (raygpt tokenize would ask for --overwrite)
    data = tokenize_corpus(config, replace_changed=True)
    print(f"raygpt tokenize: {data.summary()}")
    finetune_data = tokenize_finetune(config, replace_changed=True)
    print(f"raygpt tokenize-finetune: {finetune_data.summary()}")
    _timed(timings, "tokenize", started)

    started = time.perf_counter()
    # a stage whose inputs changed starts over: new data -> new pretraining -> new fine-tuning
    fresh_pretrain = fresh or not data.up_to_date
    pretrained = pretrain(config, fresh=fresh_pretrain)
    _timed(timings, "pretrain", started)

    started = time.perf_counter()
    finetuned = finetune(config, fresh=fresh_pretrain or not finetune_data.up_to_date or not pretrained.get("cached"))
    _timed(timings, "finetune", started)

    summary: dict[str, Any] = {
        "run_dir": config.run.dir,
        "data": {
            "location": data.location,
            "tokens": _split_tokens(load_manifest(data.location)),
            "finetune_location": finetune_data.location,
        },
        "pretrain": {
            "steps": pretrained.get("steps"),
            "tokens_seen": pretrained.get("tokens"),
            "val_ce": pretrained.get("val_loss"),
            "unigram_ce": pretrained.get("unigram_ce"),
            "unigram_val_ce": pretrained.get("unigram_val_ce"),
            "loss_curve": pretrained.get("loss_curve"),
            "export": pretrained.get("export"),
        },
        "finetune": {
            "steps": finetuned.get("steps"),
            "exact_match_before": (finetuned.get("exact_match_before") or {}).get("exact_match"),
            "exact_match_after": (finetuned.get("exact_match_after") or {}).get("exact_match"),
            "heldout_examples": (finetuned.get("exact_match_after") or {}).get("n"),
            "loss_curve": finetuned.get("loss_curve"),
            "export": finetuned.get("export"),
        },
    }
    if config.eval.tasks:  # few-shot evaluation of the fine-tuned model, when tasks are configured
        from pipeline.eval.run import evaluate, summary_line

        started = time.perf_counter()
        scores = evaluate(config, export=finetuned.get("export"))
        _timed(timings, "eval", started)
        summary["eval"] = {"line": summary_line(scores), "results": scores["results"], "plot": scores["plot"]}
    if serve:
        from pipeline.serve.deploy import curl_example, deploy

        started = time.perf_counter()
        url = deploy(config, export=finetuned.get("export"))
        examples = heldout_examples(load_manifest(finetune_data.location))
        prompt = examples[SAMPLE_PROMPT_INDEX]["prompt"] if examples else "ROMEO:"
        response = sample_request(url, config, prompt)
        _timed(timings, "serve", started)
        summary["serve"] = {
            "url": url,
            "sample_prompt": prompt,
            "sample_completion": response["choices"][0]["text"],
            "curl": curl_example(config, url),
        }
    timings["total"] = round(time.perf_counter() - started_all, 1)
    summary["seconds"] = timings
    summary["logs"] = log_dir()
    _write_summary(config, summary)
    print_summary(summary)
    if serve and not exit_after_sample:
        from pipeline.serve.deploy import serve_forever, shutdown

        print("serving until Ctrl-C ...")
        try:
            serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            shutdown()
    return summary


def _split_tokens(manifest: Any) -> dict[str, int]:
    return {name: split.tokens for name, split in manifest.splits.items()}


def _write_summary(config: PipelineConfig, summary: dict[str, Any]) -> None:
    location = RunLayout.of(config).summary_file
    storage.write_bytes(location, (json.dumps(summary, indent=2, default=str) + "\n").encode())
    summary["summary_file"] = location


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def print_summary(summary: dict[str, Any]) -> None:
    pre, fin = summary["pretrain"], summary["finetune"]
    tokens = summary["data"]["tokens"]
    yardstick = pre.get("unigram_val_ce") or pre["unigram_ce"]
    lines = [
        "",
        "=" * 72,
        "raygpt run summary",
        f"  data       {', '.join(f'{k}: {v:,} tokens' for k, v in tokens.items())}",
        f"  pretrain   {pre['steps']} steps, {pre['tokens_seen']:,} tokens seen; val CE {pre['val_ce']:.3f} nats "
        f"vs unigram CE {yardstick:.3f} on the same tokens (margin {yardstick - pre['val_ce']:.2f}; train-shard "
        f"unigram entropy {pre['unigram_ce']:.3f})",
        f"  finetune   held-out exact match {_pct(fin['exact_match_before'])} -> {_pct(fin['exact_match_after'])} "
        f"({fin['heldout_examples']} examples)",
        f"  exports    {pre['export']}",
        f"             {fin['export']}",
        f"  curves     {pre['loss_curve']}",
        f"             {fin['loss_curve']}",
    ]
    if "eval" in summary:
        lines += [f"  eval       {summary['eval']['line']}", f"             {summary['eval']['results']}"]
    if "serve" in summary:
        serve = summary["serve"]
        lines += [
            f"  endpoint   {serve['url']}/v1",
            f"  sample     {serve['sample_prompt']!r}",
            f"  completion {serve['sample_completion']!r}",
        ]
    lines += [
        f"  time       {', '.join(f'{k} {v:.0f}s' for k, v in summary['seconds'].items())}",
        f"  summary    {summary['summary_file']}",
        f"  logs       {summary['logs']} (Ray's: every worker's output, Ray Data's and Ray Train's logs)",
        "=" * 72,
    ]
    print("\n".join(lines))
