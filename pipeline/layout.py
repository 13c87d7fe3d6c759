"""Every path inside a run directory, and the one policy for which export of a run is the newest.

::

    <run.dir>/
      data/                      pretraining dataset (manifest.json + shards)         raygpt tokenize
      finetune_data/             prompt/completion dataset                           raygpt tokenize-finetune
      <run.name>-pretrain/       Ray Train experiment: checkpoint_*/ (ZeRO-3 shards)  raygpt pretrain
      <run.name>-finetune/                                                           raygpt finetune
      pretrain/  finetune/       state.json, metrics.jsonl, loss_curve.png of the stage
      export/pretrained/ finetuned/ imported/ init/    exports (model.safetensors + config.json)
      summary.json               the last ``raygpt run``'s summary
      raygpt.lock                the holder of the run dir, while a command writes into it (pipeline.runlock)

``run.dir`` is a local path or a URI; every location here is built with :func:`pipeline.storage.join`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pipeline import storage

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import PipelineConfig

Stage = Literal["pretrain", "finetune"]
ExportName = Literal["finetuned", "pretrained", "imported", "init"]
# Newest first: a fine-tuned model beats the pretrained one it came from, which beats an imported or untrained one.
EXPORTS_NEWEST_FIRST: tuple[ExportName, ...] = ("finetuned", "pretrained", "imported", "init")
STAGE_EXPORT: dict[Stage, ExportName] = {"pretrain": "pretrained", "finetune": "finetuned"}
EXPORT_CONFIG = "config.json"  # present only in a complete export (written last)


@dataclass(frozen=True)
class RunLayout:
    root: str  # run.dir, as configured
    name: str = "raygpt"  # run.name: prefixes the Ray Train experiments

    @classmethod
    def of(cls, config: PipelineConfig) -> RunLayout:
        return cls(config.run.dir, config.run.name)

    # ------------------------------------------------------------------------------------------ datasets

    @property
    def data(self) -> str:
        return storage.join(self.root, "data")

    @property
    def finetune_data(self) -> str:
        return storage.join(self.root, "finetune_data")

    def dataset(self, stage: Stage) -> str:
        return self.data if stage == "pretrain" else self.finetune_data

    # ------------------------------------------------------------------------------------------ training

    def experiment_name(self, stage: Stage) -> str:
        return f"{self.name}-{stage}"

    @property
    def storage_path(self) -> str:
        """Ray Train's ``storage_path``: the run dir, absolute (workers run in another directory)."""
        return storage.absolute(self.root)

    def experiment(self, stage: Stage) -> str:
        return storage.join(self.storage_path, self.experiment_name(stage))

    def stage_dir(self, stage: Stage) -> str:
        return storage.join(self.root, stage)

    def state_file(self, stage: Stage) -> str:
        return storage.join(self.root, stage, "state.json")

    def metrics_file(self, stage: Stage) -> str:
        return storage.join(self.root, stage, "metrics.jsonl")

    def loss_curve(self, stage: Stage) -> str:
        return storage.join(self.root, stage, "loss_curve.png")

    @property
    def eval_dir(self) -> str:
        return storage.join(self.root, "eval")

    @property
    def summary_file(self) -> str:
        return storage.join(self.root, "summary.json")

    @property
    def lock_file(self) -> str:
        return storage.join(self.root, "raygpt.lock")

    # ------------------------------------------------------------------------------------------ exports

    @property
    def exports(self) -> str:
        return storage.join(self.root, "export")

    def export(self, name: ExportName) -> str:
        return storage.join(self.root, "export", name)

    def stage_export(self, stage: Stage) -> str:
        return self.export(STAGE_EXPORT[stage])

    def newest_export(self) -> str:
        """The first complete export of :data:`EXPORTS_NEWEST_FIRST`; when there is none, the untrained ``init``
        location, so that loading it fails with an error naming where an export was expected."""
        for name in EXPORTS_NEWEST_FIRST:
            location = self.export(name)
            if is_complete_export(location):
                return location
        return self.export(EXPORTS_NEWEST_FIRST[-1])


def is_complete_export(location: str) -> bool:
    """Whether ``location`` holds a published export (its visible version has the config, written last)."""
    return storage.exists(storage.join(storage.resolve(location), EXPORT_CONFIG))


def resolve_export(config: PipelineConfig, export: str | None = None) -> str:
    """The export to serve, sample from or convert: ``export``, else ``serve.export``, else the run's newest."""
    if export:
        return export
    if config.serve.export:
        return str(config.serve.export)
    return RunLayout.of(config).newest_export()
