"""The one layout of the MO-DiT branch's materialised artefacts: its asset keys, the files inside their version
folders, and the consistent set of latest records that `expand` reads (the CLI and the service alike)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.embeddings import CatalogEmbeddings
from r4t_pipeline.modit.config import STAGES, ModitConfig
from r4t_pipeline.modit.expand import resolve_task
from r4t_pipeline.modit.tasks import TaskData
from r4t_pipeline.records import Record, RecordStore, check_consistent

TASK_DIR = "task"              # in a task_data version: the TaskData folder
EVALUATION_DIR = "evaluation"  # in the evaluation version: what `run_modit_evaluation` writes
LATENCY_FILE = "latency.json"  # in the evaluation version: the generator's seconds per batch of seed sets
EVALUATION = "modit/evaluation"


def task_asset(task: str) -> str:
    return f"modit/{task}/task_data"


def stage_asset(protocol: str, stage: str) -> str:
    return f"modit/{protocol}/{stage}"


@dataclass(frozen=True)
class ExpansionArtefacts:
    """The latest records one task and protocol's expansion reads, built from the same upstream versions."""

    catalog: str
    task: str
    protocol: str
    records: dict[str, Record]

    @property
    def versions(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((asset, record.version) for asset, record in self.records.items()))

    def checkpoints(self) -> dict[str, str]:
        return {stage: self.records[stage_asset(self.protocol, stage)].model for stage in STAGES}

    def load(self) -> tuple[TaskData, Catalog, CatalogEmbeddings]:
        return (TaskData.load(Path(self.records[task_asset(self.task)].path) / TASK_DIR),
                Catalog.load(self.records[f"{self.catalog}/catalog"].path),
                CatalogEmbeddings.load(self.records[f"{self.catalog}/item_embeddings"].path))

    def interpolation_lambda(self) -> float | None:
        """The interpolation's λ, chosen on validation by the evaluation (None before it has run)."""
        if EVALUATION not in self.records:
            return None
        path = Path(self.records[EVALUATION].path) / EVALUATION_DIR / "evaluation.json"
        cells = json.loads(path.read_text())["cells"]
        return next((c["lambda"] for c in cells if c["task"] == self.task and c["protocol"] == self.protocol), None)


def latest_expansion(store: RecordStore, cfg: ModitConfig, catalog: str, task: str,
                     protocol: str) -> ExpansionArtefacts:
    """ValueError for a catalog without tasks, an unknown task or an untrained protocol; FileNotFoundError for what
    is not materialised; ArtefactMismatch (with what to re-materialise) for records of different upstream versions."""
    if not any(t.domain == catalog for t in cfg.tasks):
        raise ValueError(f"no MO-DiT attribute task on catalog {catalog!r} (modit.tasks in $R4T_CONFIG)")
    name = resolve_task(cfg, catalog, task)
    if protocol not in cfg.protocols:
        raise ValueError(f"protocol {protocol!r} is not trained; configured: {', '.join(cfg.protocols)}")
    assets = [f"{catalog}/catalog", f"{catalog}/item_embeddings", task_asset(name),
              *(stage_asset(protocol, stage) for stage in STAGES)]
    if store.file(EVALUATION).is_file():
        assets.append(EVALUATION)
    records = {asset: store.read(asset) for asset in assets}
    check_consistent(records.values())
    return ExpansionArtefacts(catalog, name, protocol, records)
