"""The ``raygpt`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.export import ExportError
from pipeline.tokenizer import TokenizerError


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
    import torch

    from pipeline import storage
    from pipeline.export import load_export
    from pipeline.generate import sample
    from pipeline.tokenizer import get_tokenizer

    config = _config(args)
    location = args.export or storage.join(config.run.dir, "export", "init")
    model, info = load_export(location)
    tokenizer = get_tokenizer(info.tokenizer.get("name", config.data.tokenizer), config.data.tokenizer_file)
    if info.tokenizer.get("sha256") not in (None, tokenizer.sha256):
        raise ExportError(f"export {location!r} was made with another {tokenizer.name} file (sha256 differs)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    new_ids = sample(
        model,
        prompt_ids,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed if args.seed is not None else config.run.seed,
        stop_ids=(tokenizer.eot_id,),
    )
    print(args.prompt + tokenizer.decode(new_ids))
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

    models = commands.add_parser("models", help="list the model presets (GPT-3 Table 2.1 and tiny CPU sizes)")
    models.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    models.set_defaults(handler=cmd_models)

    init = commands.add_parser("init-export", help="write an untrained export of model.preset")
    _config_args(init)
    init.add_argument("--out", metavar="DIR", help="export directory (default <run.dir>/export/init)")
    init.set_defaults(handler=cmd_init_export)

    generate = commands.add_parser("generate", help="complete a prompt locally from an export (no Serve)")
    _config_args(generate)
    generate.add_argument("--export", metavar="DIR", help="export directory or URI (default <run.dir>/export/init)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.8)
    generate.add_argument("--top-k", type=int, default=50)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(handler=cmd_generate)
    return parser


USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ExportError, TokenizerError, ValueError, FileNotFoundError)


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
