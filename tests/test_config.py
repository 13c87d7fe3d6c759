"""The typed config tree: defaults, cluster.yaml, --set overrides, and errors that name the key path."""

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, PipelineConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_embedded_local_profile() -> None:
    config = load_config()
    assert config.run.dir == "runs/default"
    assert config.run.num_cpus == 2
    assert config.data.inputs == ["data/sample/shakespeare"]
    assert (REPO / config.data.inputs[0]).is_dir()
    assert config.data.context_length == 128
    assert config.model.preset == "tiny"
    assert config.train.num_workers == 2 and not config.train.use_gpu
    assert config.serve.host == "127.0.0.1" and config.serve.port == 8000
    assert config.serve.api_key is None


def test_cluster_yaml_metadata_pipeline_is_read() -> None:
    config = load_config(REPO / "cluster.yaml")
    assert config.model.preset == "gpt3-small"
    assert config.data.context_length == 2048
    assert config.train.use_gpu and config.train.num_workers == 16
    assert config.run.dir.startswith("s3://")
    assert all(uri.startswith("s3://") for uri in config.data.inputs)
    assert config.serve.autoscaling is not None and config.serve.autoscaling.max_replicas == 8


def test_overrides_parse_yaml_scalars_and_flow_lists() -> None:
    config = load_config(
        overrides=[
            "train.max_steps=200",
            "data.inputs=[corpus/, more.jsonl]",
            "train.learning_rate=1e-3",
            "train.use_gpu=true",
            "run.dir=s3://bucket/run",
            "serve.autoscaling.max_replicas=4",
            "run.name=123",
        ]
    )
    assert config.train.max_steps == 200
    assert config.data.inputs == ["corpus/", "more.jsonl"]
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.train.use_gpu is True
    assert config.run.dir == "s3://bucket/run"
    assert config.serve.autoscaling is not None and config.serve.autoscaling.max_replicas == 4
    assert config.run.name == "123"


def test_overrides_apply_on_top_of_the_file() -> None:
    config = load_config(REPO / "cluster.yaml", ["model.preset=tiny", "data.context_length=64"])
    assert config.model.preset == "tiny" and config.data.context_length == 64
    assert config.train.use_gpu  # untouched keys keep the file's values


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc' [--set train.max_steps=abc]"),
        ("train.use_gpu=maybe", "train.use_gpu: expected a boolean"),
        ("data.inputs=3", "data.inputs: expected a list"),
        ("train.max_stepz=1", "train.max_stepz: unknown key (did you mean 'max_steps'?"),
        ("trian.max_steps=1", "trian: unknown key (did you mean 'train'?"),
        ("model.preset=gpt3-smal", "did you mean 'gpt3-small'?"),
        ("train.num_workers=0", "train.num_workers: Input should be greater than or equal to 1"),
        ("data.bad_utf8=ignore", "data.bad_utf8: Input should be 'replace' or 'fail'"),
        ("data.context_length=4096", "data.context_length (4096) exceeds the context of model preset 'tiny' (128)"),
        ("serve.max_batch_size=64", "must not exceed max_ongoing_requests"),
    ],
)
def test_bad_values_name_the_key_path(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=[override])
    assert expected in str(caught.value)


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "max_steps=3", "train..max_steps=3", "train.x={a: 1}"])
def test_malformed_overrides(override: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        load_config(overrides=[override])


def test_file_errors_point_into_the_file(tmp_path: Path) -> None:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cluster["metadata"]["pipeline"]["train"]["num_workers"] = "two"
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cluster))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "train.num_workers: expected an integer, got 'two'" in message
    assert "metadata.pipeline.train.num_workers" in message

    del cluster["metadata"]
    path.write_text(yaml.safe_dump(cluster))
    with pytest.raises(ConfigError, match="without a metadata.pipeline section"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_plain_yaml_file_round_trips_through_config_show(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", "--set", "train.max_steps=7", "--set", "serve.api_key=s3cret"]) == 0
    shown = capsys.readouterr().out
    assert "s3cret" not in shown  # secrets are masked
    tree = yaml.safe_load(shown)
    assert tree["train"]["max_steps"] == 7
    del tree["serve"]["api_key"]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert load_config(path) == load_config(overrides=["train.max_steps=7"])


def test_cli_reports_config_errors_without_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "show", "--set", "train.max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raygpt: error: invalid configuration")
    assert "train.max_steps" in err and "Traceback" not in err


def test_every_section_forbids_unknown_keys() -> None:
    for name, field in PipelineConfig.model_fields.items():
        section = field.annotation
        assert section.model_config.get("extra") == "forbid", name


def test_readme_config_reference_is_generated_from_the_models() -> None:
    from pipeline.config_docs import BEGIN, END, reference_markdown

    readme = (REPO / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README.md lacks the generated config reference"
    shown = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert shown == reference_markdown(), "README.md's config reference is stale: paste `raygpt config reference`"
    for key in [
        "run.dir",
        "data.inputs",
        "data.context_length",
        "model.preset",
        "train.max_steps",
        "train.num_workers",
        "serve.port",
    ]:
        assert f"`{key}`" in shown


def test_an_empty_api_key_is_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve.api_key: ""` used to switch authentication off silently, even with RAYGPT_API_KEY set."""
    monkeypatch.delenv("RAYGPT_API_KEY", raising=False)
    config = load_config(None, ['serve.api_key=""'])
    assert config.serve.api_key is None and config.serve.resolved_api_key() is None
    monkeypatch.setenv("RAYGPT_API_KEY", "from-the-environment")
    assert load_config(None, ['serve.api_key=""']).serve.resolved_api_key() == "from-the-environment"
    assert load_config(None, ["serve.api_key=set-here"]).serve.resolved_api_key() == "set-here"
    monkeypatch.setenv("RAYGPT_API_KEY", "")
    assert load_config(None, []).serve.resolved_api_key() is None
