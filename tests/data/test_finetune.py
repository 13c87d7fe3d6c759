"""Fine-tuning data (raygpt tokenize-finetune) and the shipped sample set (data/sample/finetune)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.data.finetune import tokenize_finetune
from pipeline.data.reader import FinetuneStore, SequenceStore, heldout_examples, load_manifest
from pipeline.model.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "finetune"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def build(run: Path, train: list[Path], heldout: list[Path], overwrite: bool = False, **settings: Any) -> Any:
    overrides = [f"run.dir={run}", f"finetune.inputs={json.dumps([str(p) for p in train])}"]
    overrides.append(f"finetune.eval_inputs={json.dumps([str(p) for p in heldout])}")
    overrides += [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return tokenize_finetune(load_config(None, overrides), overwrite=overwrite, log=lambda _: None)


def test_sample_set_is_reproduced_byte_for_byte(tmp_path: Path) -> None:
    script = REPO / "data" / "sample" / "make_finetune.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_sample_set_is_a_small_balanced_exact_match_task() -> None:
    tokenizer = get_tokenizer()
    splits = {
        name: [json.loads(line) for line in (SAMPLE / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "heldout")
    }
    assert 2000 <= len(splits["train"]) <= 5000 and 200 <= len(splits["heldout"]) <= 600
    lines = {name: {e["prompt"].split("\nLine: ")[1] for e in examples} for name, examples in splits.items()}
    assert not lines["train"] & lines["heldout"]  # no line in both splits
    for examples in splits.values():
        labels = Counter(e["completion"] for e in examples)
        assert len(labels) == 12 and all(c.startswith(" ") and c.strip().isalpha() for c in labels)
        by_play: dict[str, Counter[str]] = {}
        for e in examples:
            by_play.setdefault(e["prompt"].split("\n")[0], Counter())[e["completion"]] += 1
        assert all(len(c) == 2 and len(set(c.values())) == 1 for c in by_play.values())  # balanced per play
        assert max(len(tokenizer.encode(e["prompt"])) for e in examples) < 80


def test_tokenize_sample_set(tmp_path: Path) -> None:
    result = build(tmp_path, [SAMPLE / "train.jsonl"], [SAMPLE / "heldout.jsonl"])
    assert "train 2," in result.summary()
    manifest = load_manifest(str(tmp_path), kind="finetune")
    assert manifest.kind == "finetune" and set(manifest.splits) == {"train", "heldout"}
    tokenizer = get_tokenizer()
    train = FinetuneStore(manifest, "train")
    raw = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
    assert len(train) == len(raw) == manifest.splits["train"].sequences
    for (ids, mask), example in zip(train.read(0, 50), raw[:50], strict=True):
        assert ids.dtype == np.int64 and mask.dtype == np.bool_ and ids.shape == mask.shape
        assert len(ids) <= manifest.context_length + 1 and not mask[0] and mask[-1]
        assert tokenizer.decode(ids) == example["prompt"] + example["completion"] + "<|endoftext|>"
        assert tokenizer.decode(ids[mask]) == example["completion"] + "<|endoftext|>"
        assert ids[-1] == tokenizer.eot_id
    assert [x[0].tolist() for x in train.read(10, 20)] == [x[0].tolist() for x in train.read(0, 30)[10:20]]
    held = heldout_examples(manifest)
    assert held == [json.loads(line) for line in (SAMPLE / "heldout.jsonl").read_text().splitlines()]
    with pytest.raises(DataError, match="has no split .nope."):
        FinetuneStore(load_manifest(str(tmp_path / "finetune_data")), "nope")
    with pytest.raises(DataError, match="use FinetuneStore"):
        SequenceStore(manifest, "train")


def test_overlong_examples_are_truncated_or_rejected_and_counted(tmp_path: Path) -> None:
    long_prompt = "word " * 200
    rows = [{"prompt": "Q: a", "completion": " b"}, {"prompt": long_prompt, "completion": " end"}]
    rows.append({"prompt": "x", "completion": " y" * 300})  # even the completion does not fit
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    truncated = build(tmp_path / "one", [data], [], **{"data.context_length": 32})
    stats = truncated.manifest["splits"]["train"]
    assert (stats["examples"], stats["truncated"], stats["rejected"]) == (2, 1, 1)
    ids, mask = FinetuneStore(load_manifest(str(tmp_path / "one"), kind="finetune"), "train").read(1, 2)[0]
    assert len(ids) == 33 and get_tokenizer().decode(ids[mask]) == " end<|endoftext|>"
    rejected = build(tmp_path / "two", [data], [], **{"data.context_length": 32, "finetune.overlong": "reject"})
    stats = rejected.manifest["splits"]["train"]
    assert (stats["examples"], stats["truncated"], stats["rejected"]) == (1, 0, 2)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", r"train\.jsonl, line 2: not valid JSON"),
        (json.dumps({"prompt": "p"}), r"train\.jsonl, line 2: no 'completion' field"),
        (json.dumps({"prompt": "p", "completion": 3}), r"train\.jsonl, line 2: 'completion' is a int"),
        (json.dumps({"prompt": "", "completion": " x"}), r"train\.jsonl, line 2: empty 'prompt'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": " b"}, line])
    with pytest.raises(DataError, match=message):
        build(tmp_path / "run", [data], [])
    assert not (tmp_path / "run" / "finetune_data").exists()


def test_rerun_noop_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": " b"}])
    args = ["tokenize-finetune", "--set", f"run.dir={tmp_path / 'run'}", "--set", f"finetune.inputs=[{data}]"]
    args += ["--set", "finetune.eval_inputs=[]"]
    assert main(args) == 0 and "train 1 examples" in capsys.readouterr().out
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main([*args, "--set", "finetune.overlong=reject"]) == 2
    assert "different dataset (settings.overlong: 'truncate' -> 'reject')" in capsys.readouterr().err
    assert main([*args, "--set", "finetune.overlong=reject", "--overwrite"]) == 0
