"""The export format: safetensors + config.json, verified on load, written atomically."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.export.format import CONFIG_FILE, WEIGHTS_FILE, ExportError, load_export, save_export
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.tokenizer import get_tokenizer

CONFIG = GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


def _logits(model: GPT) -> torch.Tensor:
    ids = torch.tensor([[15496, 995, 11, 50256, 464]])
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_gives_identical_weights_and_logits(model: GPT, tmp_path: Path) -> None:
    target = tmp_path / "export"
    save_export(model, CONFIG, target, get_tokenizer().info(), metadata={"stage": "test"})
    assert sorted(p.name for p in target.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded, info = load_export(target)
    assert info.model == CONFIG
    assert info.tokenizer == {"name": "r50k_base", "sha256": get_tokenizer().sha256}
    assert info.metadata == {"stage": "test"}
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(_logits(model), _logits(loaded))
    document = json.loads((target / CONFIG_FILE).read_text())
    assert document["format"] == "raygpt-export" and document["weights"]["n_params"] == model.num_params()


def test_file_uri_and_replacement_leave_no_staging(model: GPT, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/exports/one"
    save_export(model, CONFIG, uri, get_tokenizer().info())
    save_export(model, CONFIG, uri, get_tokenizer().info(), metadata={"second": True})
    _, info = load_export(uri)
    assert info.metadata == {"second": True}
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["one"]


def test_failed_save_leaves_nothing_that_looks_complete(model: GPT, tmp_path: Path) -> None:
    target = tmp_path / "export"
    with pytest.raises(TypeError):
        save_export(model, CONFIG, target, get_tokenizer().info(), metadata={"bad": object()})
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_or_foreign_exports_are_refused(model: GPT, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_export(tmp_path / "missing")
    target = tmp_path / "export"
    save_export(model, CONFIG, target, get_tokenizer().info())
    weights = target / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match the sha256"):
        load_export(target)
    weights.unlink()
    with pytest.raises(ExportError, match="is missing"):
        load_export(target)
    (target / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        load_export(target)
    (target / CONFIG_FILE).write_text(json.dumps({"format": "pickle"}))
    with pytest.raises(ExportError, match="not a raygpt export"):
        load_export(target)


def test_weights_that_do_not_fit_the_config_are_refused(model: GPT, tmp_path: Path) -> None:
    target = tmp_path / "export"
    bigger = GPTConfig(**{**CONFIG.to_dict(), "d_model": 64})
    save_export(model, CONFIG, target, get_tokenizer().info())
    document = json.loads((target / CONFIG_FILE).read_text())
    document["model"] = bigger.to_dict()
    (target / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ExportError, match="has shape"):
        load_export(target)


def test_a_folder_that_is_not_an_export_is_never_replaced(model: GPT, tmp_path: Path) -> None:
    """`--out ~/models` used to rename the folder away and delete it once the export was in place."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a raygpt export.*--overwrite"):
        save_export(model, CONFIG, folder, get_tokenizer().info())
    assert (folder / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    save_export(model, CONFIG, folder, get_tokenizer().info(), overwrite=True)  # asked for explicitly
    assert (folder / CONFIG_FILE).is_file() and not (folder / "notes.txt").exists()
    save_export(model, CONFIG, folder, get_tokenizer().info())  # an export is replaced by the next one
    (tmp_path / "empty").mkdir()
    save_export(model, CONFIG, tmp_path / "empty", get_tokenizer().info())


def test_cli_export_hf_and_import_refuse_foreign_folders_and_keep_sources(model: GPT, tmp_path: Path) -> None:
    from pipeline.cli import main

    export = save_export(model, CONFIG, tmp_path / "export", get_tokenizer().info())
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["export", "--hf", str(folder), "--source", export]) == 2
    assert (folder / "notes.txt").read_text() == "mine"
    hf = tmp_path / "hf"
    assert main(["export", "--hf", str(hf), "--source", export]) == 0
    assert main(["export", "--hf", str(hf), "--source", export]) == 0  # a GPT-2 directory is replaced
    assert main(["import-hf", str(hf), "--out", str(hf)]) == 2  # importing onto the source would delete it
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert main(["import-hf", str(hf), "--out", str(folder)]) == 2
    assert (folder / "notes.txt").read_text() == "mine"
    assert main(["import-hf", str(hf), "--out", str(folder), "--overwrite"]) == 0
    assert load_export(folder)[1].metadata["stage"] == "import-hf"
