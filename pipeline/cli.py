"""The ``raygpt`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.data.errors import DataError
from pipeline.export import ExportError
from pipeline.tokenizer import TokenizerError
from pipeline.train import TrainError


def _human(count: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


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


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(_config(args).to_yaml())
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from pipeline.config_docs import reference_markdown

    print(reference_markdown())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.presets import preset_rows

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


def cmd_init_export(args: argparse.Namespace) -> int:
    """Write an untrained export of the configured model (a starting point for serving before training)."""
    import torch

    from pipeline import storage
    from pipeline.export import save_export
    from pipeline.model import GPT
    from pipeline.tokenizer import get_tokenizer

    config = _config(args)
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_file)
    model_config = config.model.gpt_config(vocab_size=tokenizer.n_vocab)
    torch.manual_seed(config.run.seed)
    model = GPT(model_config)
    target = args.out or storage.join(config.run.dir, "export", "init")
    written = save_export(
        model, model_config, target, tokenizer.info(), metadata={"stage": "init", "preset": config.model.preset}
    )
    print(f"wrote untrained {config.model.preset} export ({_human(model.num_params())} parameters) to {written}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Complete prompts locally with the batched generation engine (no Ray, no Serve)."""
    from pipeline.generate import SamplingParams, complete

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
    if len(prompts) == 1:  # stream the one completion as it is generated
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

        def show(_index: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        complete(config, prompts, params, args.export, on_text=show)
        sys.stdout.write("\n")
        return 0
    for prompt, completion in zip(prompts, complete(config, prompts, params, args.export), strict=True):
        print(f"{prompt}{completion.text}\n[{completion.finish_reason}, {completion.completion_tokens} tokens]\n")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the OpenAI-compatible endpoint on Ray Serve (blocking unless --detach), or stop it (--stop)."""
    import os

    from pipeline.serve import curl_example, deploy, serve_forever, shutdown

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
        print("raygpt serve: application deleted and Serve stopped")
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


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Tokenize data.inputs into <run.dir>/data (packed sequences + manifest)."""
    from pipeline.data.build import tokenize_corpus

    result = tokenize_corpus(_config(args), overwrite=args.overwrite)
    print(result.summary())
    return 0


def cmd_tokenize_finetune(args: argparse.Namespace) -> int:
    """Tokenize finetune.inputs / finetune.eval_inputs into <run.dir>/finetune_data."""
    from pipeline.data.finetune import tokenize_finetune

    result = tokenize_finetune(_config(args), overwrite=args.overwrite)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raygpt", description="GPT-3-style pipeline on Ray: tokenize, pretrain, fine-tune, serve."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_parser = commands.add_parser("config", help="inspect the resolved configuration")
    config_commands = config_parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved config tree as YAML")
    _config_args(show)
    show.set_defaults(handler=cmd_config_show)
    reference = config_commands.add_parser("reference", help="print the config reference (Markdown, as in README)")
    reference.set_defaults(handler=cmd_config_reference)

    models = commands.add_parser("models", help="list the model presets (GPT-3 Table 2.1 and tiny CPU sizes)")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models.set_defaults(handler=cmd_models)

    init = commands.add_parser("init-export", help="write an untrained export of model.preset")
    _config_args(init)
    init.add_argument("--out", metavar="DIR", help="export directory (default <run.dir>/export/init)")
    init.set_defaults(handler=cmd_init_export)

    export_help = "export directory or URI (default: serve.export, else <run.dir>/export/finetuned, pretrained, init)"
    generate = commands.add_parser("generate", help="complete prompts locally from an export (no Serve)")
    _config_args(generate)
    generate.add_argument("--export", metavar="DIR", help=export_help)
    generate.add_argument("--prompt", required=True, action="append", help="repeat for a batch of prompts")
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    generate.add_argument("--top-k", type=int, default=50, help="0: off")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument("--seed", type=int, default=None, help="default: run.seed")
    generate.set_defaults(handler=cmd_generate)

    serve_cmd = commands.add_parser("serve", help="serve an export over an OpenAI-compatible HTTP API (Ray Serve)")
    _config_args(serve_cmd)
    serve_cmd.add_argument("--export", metavar="DIR", help=export_help)
    serve_cmd.add_argument("--detach", action="store_true", help="return once up, leaving it on the Ray cluster")
    serve_cmd.add_argument("--stop", action="store_true", help="delete the application and stop Serve")
    serve_cmd.set_defaults(handler=cmd_serve)

    tokenize = commands.add_parser("tokenize", help="tokenize and pack data.inputs into <run.dir>/data")
    _config_args(tokenize)
    tokenize.add_argument("--overwrite", action="store_true", help="replace a different dataset already there")
    tokenize.set_defaults(handler=cmd_tokenize)

    tokenize_ft = commands.add_parser(
        "tokenize-finetune", help="tokenize prompt/completion data into <run.dir>/finetune_data"
    )
    _config_args(tokenize_ft)
    tokenize_ft.add_argument("--overwrite", action="store_true", help="replace a different dataset already there")
    tokenize_ft.set_defaults(handler=cmd_tokenize_finetune)

    from pipeline.cli_train import add_commands as add_train_commands

    add_train_commands(commands, _config_args)
    return parser


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    TrainError,
    ExportError,
    TokenizerError,
    DataError,
    ValueError,
    FileNotFoundError,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
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
