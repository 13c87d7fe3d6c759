"""``raygpt pretrain``, ``finetune``, ``export`` and ``import-hf``: thin wrappers over pipeline.train / hf_io."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from pipeline.config import PipelineConfig, load_config


def _config(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pipeline.train import pretrain

    summary = pretrain(_config(args), fresh=args.fresh)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pipeline.train import finetune

    summary = finetune(_config(args), fresh=args.fresh)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.train import export_latest

    config = _config(args)
    if args.hf:
        from pipeline.hf_io import export_hf
        from pipeline.train import default_export

        source = args.source or default_export(config)
        print(f"wrote Hugging Face GPT-2 directory {export_hf(source, args.hf)} from {source}")
        return 0
    written = export_latest(config, args.stage, args.out)
    print(f"consolidated the latest {args.stage} checkpoint into {written}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.hf_io import import_hf

    config = _config(args)
    target = args.out or storage.join(config.run.dir, "export", "imported")
    written = import_hf(args.directory, target)
    print(
        f"imported {args.directory} as {written}; fine-tune it with: raygpt finetune --set finetune.init_from={written}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import run_pipeline

    run_pipeline(_config(args), serve=not args.no_serve, exit_after_sample=args.exit_after_sample, fresh=args.fresh)
    return 0


def add_commands(commands: Any, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    run = commands.add_parser("run", help="the whole pipeline: tokenize, pretrain, finetune, export, serve")
    config_args(run)
    run.add_argument("--no-serve", action="store_true", help="stop after training and exporting")
    run.add_argument("--exit-after-sample", action="store_true", help="exit after the sample request")
    run.add_argument("--fresh", action="store_true", help="retrain from scratch (data is reused when unchanged)")
    run.set_defaults(handler=cmd_run)

    pretrain = commands.add_parser("pretrain", help="pretrain model.preset on <run.dir>/data (DeepSpeed ZeRO-3)")
    config_args(pretrain)
    pretrain.add_argument("--fresh", action="store_true", help="discard this run's checkpoints and start over")
    pretrain.add_argument("--json", action="store_true", help="print the run summary as JSON")
    pretrain.set_defaults(handler=cmd_pretrain)

    finetune = commands.add_parser("finetune", help="fine-tune an export on <run.dir>/finetune_data")
    config_args(finetune)
    finetune.add_argument("--fresh", action="store_true", help="discard this run's checkpoints and start over")
    finetune.add_argument("--json", action="store_true", help="print the run summary as JSON")
    finetune.set_defaults(handler=cmd_finetune)

    export = commands.add_parser("export", help="consolidate ZeRO-3 checkpoints into an export, or write GPT-2 (--hf)")
    config_args(export)
    export.add_argument("--stage", choices=["pretrain", "finetune"], default="pretrain")
    export.add_argument("--out", metavar="DIR", help="export directory (default <run.dir>/export/<stage>ed)")
    export.add_argument("--hf", metavar="DIR", help="write a Hugging Face GPT-2 directory instead")
    export.add_argument("--source", metavar="EXPORT", help="with --hf: the export to convert (default: newest)")
    export.set_defaults(handler=cmd_export)

    imp = commands.add_parser("import-hf", help="turn a Hugging Face GPT-2 directory into a raygpt export")
    config_args(imp)
    imp.add_argument("directory", help="folder with config.json and model.safetensors (or pytorch_model.bin)")
    imp.add_argument("--out", metavar="DIR", help="export directory (default <run.dir>/export/imported)")
    imp.set_defaults(handler=cmd_import_hf)
