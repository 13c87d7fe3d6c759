"""Settings of the smallest whole-pipeline run the tests use (nano model, a few steps): shared by the job test and
the object-storage test, which differ only in where the run and its inputs live."""

from __future__ import annotations


def tiny_run(run_dir: str, name: str, corpus: str, finetune_train: str, finetune_heldout: str, port: int) -> list[str]:
    """``KEY=VALUE`` overrides: 3 pretraining and 2 fine-tuning steps on 32-token sequences, served on ``port``."""
    return [
        f"run.dir={run_dir}",
        f"run.name={name}",
        f"data.inputs=[{corpus}]",
        "data.txt_document=paragraph",
        "data.context_length=32",
        "data.num_tokenizers=1",
        "model.preset=nano",
        "train.max_steps=3",
        "train.checkpoint_every=3",
        "train.eval_every=3",
        "train.eval_batches=1",
        "train.micro_batch_size=2",
        "train.warmup_steps=1",
        "train.max_failures=0",
        "finetune.max_steps=2",
        "finetune.micro_batch_size=2",
        f"finetune.inputs=[{finetune_train}]",
        f"finetune.eval_inputs=[{finetune_heldout}]",
        "serve.host=127.0.0.1",
        f"serve.port={port}",
        "serve.request_timeout_s=120",
    ]


def nano_pretrain(run_dir: object, corpus: object, *extra: str) -> list[str]:
    """``KEY=VALUE`` overrides of the training tests' runs: the nano model on 32-token paragraphs of ``corpus``,
    4 sequences a micro-batch, 2 warm-up steps; ``extra`` (steps, checkpoints, faults) after them, so it wins."""
    return [
        f"run.dir={run_dir}",
        f"data.inputs=[{corpus}]",
        "data.txt_document=paragraph",
        "data.context_length=32",
        "model.preset=nano",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        *extra,
    ]
