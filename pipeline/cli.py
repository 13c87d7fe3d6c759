"""The ``raygpt`` command line: one table, :data:`COMMANDS`, maps every subcommand to the function that runs it and
the options it takes. Stage code is imported only by the command that needs it, so ``raygpt --help`` is quick.

Every error a user can cause (:data:`USER_ERRORS`) ends with one ``raygpt: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.data.errors import DataError
from pipeline.export.format import ExportError
from pipeline.layout import RunLayout, resolve_export
from pipeline.model.tokenizer import TokenizerError
from pipeline.runlock import RunDirBusy, run_lock
from pipeline.train.plan import TrainError

Args = argparse.Namespace


def _human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


def _config(args: Args) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def _print_json(summary: dict[str, Any]) -> None:
    print(json.dumps(summary, indent=2, default=str))


def _run_dir_lock(config: PipelineConfig, command: str, writes: bool = True) -> Any:
    """The run dir's lock for a command that writes into it (:mod:`pipeline.runlock`); nothing when it does not.
    ``run``, ``pretrain`` and ``finetune`` take it themselves."""
    return run_lock(config.run.dir, command) if writes else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- commands


def config_show(args: Args) -> int:
    sys.stdout.write(_config(args).to_yaml())
    return 0


def config_reference(args: Args) -> int:
    from pipeline.config_docs import reference_markdown

    print(reference_markdown())
    return 0


def models(args: Args) -> int:
    from pipeline.model.presets import preset_rows

    rows = preset_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_head':>6} {'context':>7} "
    header += f"{'params':>8} {'GFLOPs/token':>12} {'batch':>6} {'lr':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<12} {row['n_layer']:>6} {row['d_model']:>7} {row['n_head']:>5} {row['d_head']:>6} "
            f"{row['context_length']:>7} {_human(row['n_params']):>8} {row['flops_per_token'] / 1e9:>12.2f} "
            f"{_human(row['batch_tokens']):>6} {row['learning_rate']:>7.1e}"
        )
    print("\nparams: total, tied LM head counted once; GFLOPs/token: training (6N + 12*L*d*T) at the full context.")
    return 0


def init_export(args: Args) -> int:
    """Write an untrained export of the configured model (a starting point for serving before training)."""
    config = _config(args)
    with _run_dir_lock(config, "init-export", writes=args.out is None):
        return _init_export(args, config)


def _init_export(args: Args, config: PipelineConfig) -> int:
    import torch

    from pipeline.export.format import save_export
    from pipeline.model.gpt import GPT
    from pipeline.model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_file)
    model_config = config.model.gpt_config(vocab_size=tokenizer.n_vocab)
    torch.manual_seed(config.run.seed)
    model = GPT(model_config)
    target = args.out or RunLayout.of(config).export("init")
    metadata = {"stage": "init", "preset": config.model.preset}
    written = save_export(model, model_config, target, tokenizer.info(), metadata=metadata, overwrite=args.overwrite)
    print(f"wrote untrained {config.model.preset} export ({_human(model.num_params())} parameters) to {written}")
    return 0


def generate(args: Args) -> int:
    """Complete prompts locally with the batched generation engine (no Ray, no Serve)."""
    from pipeline.inference.engine import Engine
    from pipeline.inference.sampling import SamplingParams

    config = _config(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed if args.seed is not None else config.run.seed,
    )
    prompts: list[str] = args.prompt
    engine, _ = Engine.from_export(
        resolve_export(config, args.export), max_batch_size=len(prompts), tokenizer_file=config.data.tokenizer_file
    )
    ids = [engine.encode(p) for p in prompts]
    if len(prompts) == 1:  # stream the one completion as it is generated
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

        def show(_index: int, delta: Any) -> None:
            if delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()

        engine.generate(ids, params, on_delta=show)
        sys.stdout.write("\n")
        return 0
    for prompt, completion in zip(prompts, engine.generate(ids, params), strict=True):
        print(f"{prompt}{completion.text}\n[{completion.finish_reason}, {completion.completion_tokens} tokens]\n")
    return 0


def serve(args: Args) -> int:
    """Start the OpenAI-compatible endpoint on Ray Serve (blocking unless --detach), or stop it (--stop)."""
    import os

    from pipeline.serve.deploy import APP_NAME, curl_example, deploy, serve_forever, shutdown

    config = _config(args)
    if (args.detach or args.stop) and not (config.run.ray_address or os.environ.get("RAY_ADDRESS")):
        raise ValueError(
            f"{'--detach' if args.detach else '--stop'} needs a running Ray cluster that keeps the endpoint: set "
            "run.ray_address (or RAY_ADDRESS), e.g. after `ray start --head`"
        )
    if args.stop:
        from pipeline.raycluster import connect

        connect(config.run)
        shutdown()
        print(f"raygpt serve: application {APP_NAME!r} deleted (other Serve applications are left running)")
        return 0
    url = deploy(config, args.export)
    print(f"\nraygpt: serving {config.serve.model_name!r} at {url}  (OpenAI API: {url}/v1, docs: {url}/docs)")
    print(curl_example(config, url))
    if args.detach:
        print("raygpt: detached; stop it with `raygpt serve --stop` (same --config/--set)")
        return 0
    print("raygpt: Ctrl-C stops the endpoint")
    sys.stdout.flush()
    serve_forever()
    print("raygpt: endpoint stopped")
    return 0


def evaluate(args: Args) -> int:
    """lm-eval tasks at each number of shots against an export (default: the newest) or an endpoint."""
    from pipeline.eval.run import evaluate as run_eval
    from pipeline.eval.run import summary_line

    config = _config(args)
    if args.tasks:
        config.eval.tasks = [t for t in args.tasks.split(",") if t]
    if args.shots:
        config.eval.shots = [int(k) for k in args.shots.split(",") if k.strip()]
    if args.limit:
        config.eval.limit = args.limit
    summary = run_eval(config, export=args.export, endpoint=args.endpoint)
    print(f"raygpt eval: {summary_line(summary)}")
    print(f"raygpt eval: results {summary['results']}, figure {summary['plot']}")
    return 0


def tokenize(args: Args) -> int:
    """Tokenize data.inputs into <run.dir>/data (packed sequences + manifest)."""
    from pipeline.data.build import tokenize_corpus

    config = _config(args)
    with _run_dir_lock(config, "tokenize"):
        print(tokenize_corpus(config, overwrite=args.overwrite).summary())
    return 0


def tokenize_finetune(args: Args) -> int:
    """Tokenize finetune.inputs / finetune.eval_inputs into <run.dir>/finetune_data."""
    from pipeline.data.finetune import tokenize_finetune as build

    config = _config(args)
    with _run_dir_lock(config, "tokenize-finetune"):
        print(build(config, overwrite=args.overwrite).summary())
    return 0


def pretrain(args: Args) -> int:
    from pipeline.train.driver import pretrain as run

    summary = run(_config(args), fresh=args.fresh)
    if args.json:
        _print_json(summary)
    return 0


def finetune(args: Args) -> int:
    from pipeline.train.driver import finetune as run

    summary = run(_config(args), fresh=args.fresh)
    if args.json:
        _print_json(summary)
    return 0


def export(args: Args) -> int:
    config = _config(args)
    if args.hf:
        from pipeline.export.hf import export_hf

        source = args.source or RunLayout.of(config).newest_export()
        written = export_hf(source, args.hf, args.overwrite, tokenizer_file=config.data.tokenizer_file)
        print(f"wrote Hugging Face GPT-2 directory {written} (weights, config, tokenizer) from {source}")
        return 0
    from pipeline.train.consolidate import export_latest

    with _run_dir_lock(config, "export"):
        written = export_latest(config, args.stage, args.out, overwrite=args.overwrite)
    print(f"consolidated the latest {args.stage} checkpoint into {written}")
    return 0


def import_hf(args: Args) -> int:
    from pipeline.export.hf import import_hf as run

    config = _config(args)
    with _run_dir_lock(config, "import-hf", writes=args.out is None):
        written = run(args.directory, args.out or RunLayout.of(config).export("imported"), overwrite=args.overwrite)
    print(
        f"imported {args.directory} as {written}; fine-tune it with: raygpt finetune --set finetune.init_from={written}"
    )
    return 0


def run(args: Args) -> int:
    from pipeline.run import run_pipeline

    run_pipeline(_config(args), serve=not args.no_serve, exit_after_sample=args.exit_after_sample, fresh=args.fresh)
    return 0


# ---------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    kwargs: dict[str, Any]


def opt(*flags: str, **kwargs: Any) -> Option:
    return Option(flags, kwargs)


@dataclass(frozen=True)
class Command:
    handler: Callable[[Args], int]
    help: str
    options: tuple[Option, ...] = ()
    takes_config: bool = True  # --config / --set


EXPORT_HELP = "export directory or URI (default: serve.export, else the run's newest: finetuned, pretrained, ...)"
FRESH = opt("--fresh", action="store_true", help="discard this run's checkpoints and start over")
JSON_SUMMARY = opt("--json", action="store_true", help="print the run summary as JSON")
OVERWRITE = opt("--overwrite", action="store_true", help="replace a different dataset already there")
REPLACE = opt("--overwrite", action="store_true", help="replace the target folder even if it is not an export")

# "config show" is the subcommand "show" of the group "config".
COMMANDS: dict[str, Command] = {
    "run": Command(
        run,
        "the whole pipeline: tokenize, pretrain, finetune, export, serve",
        (
            opt("--no-serve", action="store_true", help="stop after training and exporting"),
            opt("--exit-after-sample", action="store_true", help="exit after the sample request"),
            opt("--fresh", action="store_true", help="retrain from scratch (data is reused when unchanged)"),
        ),
    ),
    "config show": Command(config_show, "print the resolved config tree as YAML"),
    "config reference": Command(
        config_reference, "print the config reference (Markdown, as in README)", takes_config=False
    ),
    "models": Command(
        models,
        "list the model presets (GPT-3 Table 2.1 and tiny CPU sizes)",
        (opt("--json", action="store_true", help="print a JSON list instead of a table"),),
        takes_config=False,
    ),
    "tokenize": Command(tokenize, "tokenize and pack data.inputs into <run.dir>/data", (OVERWRITE,)),
    "tokenize-finetune": Command(
        tokenize_finetune, "tokenize prompt/completion data into <run.dir>/finetune_data", (OVERWRITE,)
    ),
    "pretrain": Command(pretrain, "pretrain model.preset on <run.dir>/data (DeepSpeed ZeRO-3)", (FRESH, JSON_SUMMARY)),
    "finetune": Command(finetune, "fine-tune an export on <run.dir>/finetune_data", (FRESH, JSON_SUMMARY)),
    "export": Command(
        export,
        "consolidate ZeRO-3 checkpoints into an export, or write GPT-2 (--hf)",
        (
            opt("--stage", choices=["pretrain", "finetune"], default="pretrain"),
            opt("--out", metavar="DIR", help="export directory (default <run.dir>/export/<stage>ed)"),
            opt("--hf", metavar="DIR", help="write a Hugging Face GPT-2 directory instead"),
            opt("--source", metavar="EXPORT", help="with --hf: the export to convert (default: newest)"),
            REPLACE,
        ),
    ),
    "import-hf": Command(
        import_hf,
        "turn a Hugging Face GPT-2 directory into a raygpt export",
        (
            opt("directory", help="folder with config.json and model.safetensors (or pytorch_model.bin)"),
            opt("--out", metavar="DIR", help="export directory (default <run.dir>/export/imported)"),
            REPLACE,
        ),
    ),
    "init-export": Command(
        init_export,
        "write an untrained export of model.preset",
        (opt("--out", metavar="DIR", help="export directory (default <run.dir>/export/init)"), REPLACE),
    ),
    "generate": Command(
        generate,
        "complete prompts locally from an export (no Serve)",
        (
            opt("--export", metavar="DIR", help=EXPORT_HELP),
            opt("--prompt", required=True, action="append", help="repeat for a batch of prompts"),
            opt("--max-tokens", type=int, default=32),
            opt("--temperature", type=float, default=0.8, help="0 is greedy"),
            opt("--top-k", type=int, default=50, help="0: off"),
            opt("--top-p", type=float, default=1.0),
            opt("--stop", action="append", default=[], help="stop string (repeatable)"),
            opt("--seed", type=int, default=None, help="default: run.seed"),
        ),
    ),
    "eval": Command(
        evaluate,
        "few-shot lm-eval tasks on an export or an endpoint -> <run.dir>/eval",
        (
            opt("--export", metavar="DIR", help=EXPORT_HELP),
            opt("--endpoint", metavar="URL", help="an OpenAI-compatible base URL instead of an export"),
            opt("--tasks", metavar="A,B", help="lm-eval task names or YAML files (default: eval.tasks or raygpt_*)"),
            opt("--shots", metavar="0,1,4", help="numbers of in-context examples (default: eval.shots)"),
            opt("--limit", type=int, help="items per task"),
        ),
    ),
    "serve": Command(
        serve,
        "serve an export over an OpenAI-compatible HTTP API (Ray Serve)",
        (
            opt("--export", metavar="DIR", help=EXPORT_HELP),
            opt("--detach", action="store_true", help="return once up, leaving it on the Ray cluster"),
            opt("--stop", action="store_true", help="delete the raygpt application (only it)"),
        ),
    ),
}

GROUPS = {"config": "inspect the resolved configuration"}


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="cluster.yaml (metadata.pipeline) or a plain YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a key, e.g. --set train.max_steps=200 (repeatable; values are YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raygpt", description="GPT-3-style pipeline on Ray: tokenize, pretrain, fine-tune, serve."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, Any] = {}
    for name, command in COMMANDS.items():
        group, _, sub = name.rpartition(" ")
        if group and group not in groups:
            group_parser = commands.add_parser(group, help=GROUPS[group])
            groups[group] = group_parser.add_subparsers(dest=f"{group}_command", required=True, metavar="ACTION")
        sub_parser = (groups[group] if group else commands).add_parser(sub, help=command.help)
        if command.takes_config:
            _config_args(sub_parser)
        for option in command.options:
            sub_parser.add_argument(*option.flags, **option.kwargs)
        sub_parser.set_defaults(handler=command.handler)
    return parser


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    TrainError,
    ExportError,
    TokenizerError,
    DataError,
    RunDirBusy,
    ValueError,
    FileNotFoundError,
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[Args], int] = args.handler
    try:
        return handler(args)
    except USER_ERRORS as exc:
        print(f"raygpt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raygpt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
