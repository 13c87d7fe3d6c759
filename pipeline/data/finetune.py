"""``raygpt tokenize-finetune``: prompt/completion JSONL (OpenAI's legacy fine-tune format) to ids + loss mask.

``finetune.inputs`` become split ``train``, ``finetune.eval_inputs`` split ``heldout``, written under
``<run.dir>/finetune_data`` with the same discipline as the pretraining data (staging directory, manifest last,
no-op when unchanged, refusal to replace another dataset without ``--overwrite``).

Each line is ``{"prompt": str, "completion": str}`` (other fields ignored). An example is
``prompt ids + completion ids + <|endoftext|>``; its loss mask is True on the completion ids and the closing
``<|endoftext|>`` (see :mod:`pipeline.data.reader` for the alignment). Examples longer than
``data.context_length + 1`` ids are cut at the prompt's start (``finetune.overlong=truncate``; rejected when even
one prompt id does not fit) or rejected (``reject``); both are counted. Prompt and completion are encoded
separately, exactly as a client's prompt is encoded before the model continues it.

Fine-tuning sets are small (thousands of examples), so this runs in the driver process, without Ray.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.data import clean
from pipeline.data.build import BuildResult
from pipeline.data.documents import READ_BLOCK_BYTES
from pipeline.data.errors import DataError
from pipeline.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, check_target, fingerprint
from pipeline.data.sources import discover, read_blocks
from pipeline.data.tokenize import token_dtype
from pipeline.layout import RunLayout
from pipeline.model.tokenizer import Tokenizer, get_tokenizer

SPLITS = ("train", "heldout")


class FinetuneResult(BuildResult):
    """What ``raygpt tokenize-finetune`` did (same fields as the pretraining build's result)."""

    def summary(self) -> str:
        if self.up_to_date:
            return super().summary()
        parts = []
        for name, info in self.manifest["splits"].items():
            text = f"{name} {info['examples']:,} examples ({info['tokens']:,} tokens"
            if info["truncated"] or info["rejected"]:
                text += f", {info['truncated']} truncated, {info['rejected']} rejected as too long"
            parts.append(text + ")")
        return f"tokenized fine-tune data: {', '.join(parts)} in {self.seconds:.1f} s -> {self.location}"


def parse_jsonl(text: str, name: str) -> list[tuple[int, str, str]]:
    """(line, prompt, completion) of every non-blank line; DataError naming file and line otherwise."""
    return list(parse_jsonl_lines(text.split("\n"), name))


def parse_jsonl_lines(lines: Iterable[str], name: str) -> Iterator[tuple[int, str, str]]:
    """:func:`parse_jsonl` of a file given as its lines."""
    for number, record in clean.jsonl_line_records(lines, name):
        for field in ("prompt", "completion"):
            if field not in record:
                raise DataError(f"{name}, line {number}: no {field!r} field (fields: {', '.join(sorted(record))})")
            if not isinstance(record[field], str):
                raise DataError(f"{name}, line {number}: {field!r} is a {type(record[field]).__name__}, not a string")
            if not record[field]:
                raise DataError(f"{name}, line {number}: empty {field!r}")
        yield number, record["prompt"], record["completion"]


def read_examples(uri: str, bad_utf8: str, stats: dict[str, Any]) -> Iterator[tuple[int, str, str]]:
    """:func:`parse_jsonl` of one file, streamed in blocks; when all are read, ``stats`` holds the file's
    ``sha256``, ``examples`` and ``replaced_chars``. Errors are those of decoding the file whole, then parsing it."""
    stream = clean.StreamDecoder(read_blocks(uri, READ_BLOCK_BYTES), uri, bad_utf8)
    examples = 0
    try:
        for example in parse_jsonl_lines(clean.split_lines(clean.normalized(stream.texts(), keep_bom=True)), uri):
            examples += 1
            yield example
    except clean.BinaryFileError:
        raise
    except DataError as error:
        raise stream.outranking(error) from None
    stats.update(sha256=stream.sha256, examples=examples, replaced_chars=stream.replaced)


def encode_example(
    tokenizer: Tokenizer, prompt: str, completion: str, max_ids: int, overlong: str
) -> tuple[list[int], list[bool], bool] | None:
    """(input_ids, loss_mask, truncated), or None when the example is rejected as too long."""
    prompt_ids = tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion) + [tokenizer.eot_id]
    truncated = False
    if len(prompt_ids) + len(completion_ids) > max_ids:
        room = max_ids - len(completion_ids)
        if overlong == "reject" or room < 1:
            return None
        prompt_ids = prompt_ids[-room:]
        truncated = True
    ids = prompt_ids + completion_ids
    mask = [False] * len(prompt_ids) + [True] * len(completion_ids)
    return ids, mask, truncated


def tokenize_finetune(
    config: PipelineConfig,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    replace_changed: bool = False,
) -> FinetuneResult:
    """Build (or confirm) ``<run.dir>/finetune_data`` from ``finetune.inputs`` and ``finetune.eval_inputs``."""
    started = time.perf_counter()
    tokenizer = get_tokenizer(config.data.tokenizer, config.data.tokenizer_file)
    sources: dict[str, list[dict[str, Any]]] = {}
    for split, specs in (("train", config.finetune.inputs), ("heldout", config.finetune.eval_inputs)):
        files = discover(specs)[0] if specs else []
        for item in files:
            if item.kind != "jsonl":
                raise DataError(f"{item.uri}: fine-tune data must be prompt/completion .jsonl")
        sources[split] = [f.to_dict() for f in files]
    if not sources["train"]:
        raise DataError("no fine-tune training inputs (finetune.inputs is empty)")
    identity = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "finetune",
        "tokenizer": tokenizer.info(),
        "context_length": config.data.context_length,
        "settings": {
            "context_length": config.data.context_length,
            "overlong": config.finetune.overlong,
            "bad_utf8": config.data.bad_utf8,
            "shard_sequences": config.data.shard_sequences,
        },
        "inputs": [{"split": split, **item} for split, items in sources.items() for item in items],
    }
    key = fingerprint(identity)
    location = RunLayout.of(config).finetune_data
    if check_target(location, identity, key, overwrite, replace_changed):
        return FinetuneResult(location, {}, True, time.perf_counter() - started)
    with storage.Staged(location, last=MANIFEST) as staging:
        manifest = _build(config, tokenizer, sources, identity, key, staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return FinetuneResult(location, manifest, False, time.perf_counter() - started)


def _build(
    config: PipelineConfig,
    tokenizer: Tokenizer,
    sources: dict[str, list[dict[str, Any]]],
    identity: dict[str, Any],
    key: str,
    staging: Path,
) -> dict[str, Any]:
    max_ids = config.data.context_length + 1
    value_type = pa.from_numpy_dtype(token_dtype(tokenizer.n_vocab))
    schema = pa.schema(
        [
            ("input_ids", pa.list_(value_type)),
            ("loss_mask", pa.list_(pa.bool_())),
            ("prompt", pa.string()),
            ("completion", pa.string()),
            ("source", pa.string()),
        ]
    )
    splits: dict[str, Any] = {}
    records = []
    for split in SPLITS:
        rows: dict[str, list[Any]] = {name: [] for name in schema.names}
        stats = {"examples": 0, "tokens": 0, "completion_tokens": 0, "truncated": 0, "rejected": 0}
        for item in sources[split]:
            read: dict[str, Any] = {}
            for number, prompt, completion in read_examples(item["uri"], config.data.bad_utf8, read):
                encoded = encode_example(tokenizer, prompt, completion, max_ids, config.finetune.overlong)
                if encoded is None:
                    stats["rejected"] += 1
                    continue
                ids, mask, truncated = encoded
                stats["truncated"] += int(truncated)
                stats["examples"] += 1
                stats["tokens"] += len(ids)
                stats["completion_tokens"] += sum(mask)
                rows["input_ids"].append(ids)
                rows["loss_mask"].append(mask)
                rows["prompt"].append(prompt)
                rows["completion"].append(completion)
                rows["source"].append(f"{item['rel']}:{number}")
            records.append({"split": split, **item, **read})
        shards = []
        count = len(rows["prompt"])
        for number, start in enumerate(range(0, count, config.data.shard_sequences)):
            stop = min(count, start + config.data.shard_sequences)
            table = pa.table({name: values[start:stop] for name, values in rows.items()}, schema=schema)
            relative = f"{split}/shard-{number:05d}.parquet"
            (staging / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, staging / relative, row_group_size=1024)
            shards.append({"path": relative, "rows": stop - start, "sha256": storage.file_sha256(staging / relative)})
        splits[split] = {**stats, "sequences": stats["examples"], "shards": shards}
    if splits["train"]["examples"] == 0:
        raise DataError(
            f"no usable fine-tune training examples: all {splits['train']['rejected']} are longer than "
            f"context_length + 1 = {max_ids} tokens"
        )
    return {
        **{k: v for k, v in identity.items() if k != "inputs"},
        "fingerprint": key,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dtype": np.dtype(token_dtype(tokenizer.n_vocab)).name,
        "inputs": records,
        "splits": splits,
    }
