"""The raygpt command line: presets table and JSON, an untrained export and a generation from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

REQUIRED = {"name", "n_layer", "d_model", "n_head", "context_length", "n_params", "flops_per_token"}


def test_models_json_lists_every_preset(capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [row["name"] for row in rows]
    for name in [
        "gpt3-small",
        "gpt3-medium",
        "gpt3-large",
        "gpt3-xl",
        "gpt3-2.7b",
        "gpt3-6.7b",
        "gpt3-13b",
        "gpt3-175b",
        "tiny",
    ]:
        assert name in names
    assert all(REQUIRED <= row.keys() for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["gpt3-xl"]["n_head"] == 16 and by_name["gpt3-13b"]["d_model"] == 5120


def test_models_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gpt3-175b" in out and "GFLOPs/token" in out and "174.6B" in out


def test_init_export_then_generate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = f"run.dir={tmp_path}"
    assert main(["init-export", "--set", run_dir, "--set", "model.preset=nano", "--set", "data.context_length=64"]) == 0
    assert (tmp_path / "export" / "init" / "model.safetensors").is_file()
    capsys.readouterr()
    args = ["generate", "--set", run_dir, "--prompt", "ROMEO:", "--max-tokens", "8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.strip()) > len("ROMEO:")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # a seed makes sampling reproducible


def test_generate_without_export_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--export", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("raygpt")
    result = subprocess.run(
        [str(script), "config", "show", "--set", "train.max_steps=nope"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=60,
    )
    assert result.returncode == 2
    assert "train.max_steps: expected an integer" in result.stderr and "Traceback" not in result.stderr
