"""What assets hand each other, and what the CLI and the service read: small typed records (JSON) pointing at
immutable artefact versions on disk. The heavy data stays in Parquet, NumPy, FAISS and safetensors files.

Every record names its asset, its version (the folder it points at) and its lineage: the version of every
asset it was built from, transitively. Records used together must agree on their common ancestors
(`check_consistent`): an index built from an older catalog than the one shown to the user is refused with
what to re-materialise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

MATERIALISE = "dagster asset materialize -m r4t_pipeline.definitions --select"


class ArtefactMismatch(RuntimeError):
    """Artefacts built from different versions of the same upstream asset; the message says what to rebuild."""


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    types: ClassVar[dict[str, type[Record]]] = {}

    asset: str          # the asset key as a path, e.g. "polyvore/oar/folm_checkpoint"
    catalog: str
    path: str           # the version folder
    version: str
    lineage: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Record.types[cls.__name__] = cls

    def to_json(self) -> str:
        return json.dumps({"type": type(self).__name__, "record": self.model_dump(mode="json")}, indent=2)

    @staticmethod
    def from_json(text: str, source: str = "record") -> Record:
        try:
            payload = json.loads(text)
            return Record.types[payload["type"]].model_validate(payload["record"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{source}: not an r4t record ({err})") from None

    @staticmethod
    def lineage_of(inputs: Iterable[Record]) -> dict[str, str]:
        """The lineage of an artefact built from `inputs`: theirs, plus themselves."""
        lineage: dict[str, str] = {}
        for record in inputs:
            lineage.update(record.lineage)
            lineage[record.asset] = record.version
        return lineage


class CatalogRecord(Record):
    items: int
    collections: int


class EmbeddingsRecord(Record):
    encoder: str
    dim: int


class IndexRecord(Record):
    kind: str

    @property
    def items_path(self) -> str:
        return str(Path(self.path) / "items")

    @property
    def collections_path(self) -> str:
        return str(Path(self.path) / "collections")

    def for_regime(self, regime: str) -> str:
        """The regime's database: OAR retrieves collections, WSCR retrieves items."""
        return self.collections_path if regime == "oar" else self.items_path


class QueryCorpusRecord(Record):
    counts: dict[str, dict[str, int]]


class ModelRecord(Record):
    """A model folder: a fan-out LM (HF folder), a diffusion checkpoint."""

    model: str


class FileRecord(Record):
    """A version folder whose content the asset describes itself (targets, evaluations, reports)."""


def check_consistent(records: Iterable[Record]) -> None:
    """Refuse records built from different versions of a common upstream asset, naming what to rebuild."""
    records = list(records)
    latest = {r.asset: r for r in records}
    problems = []
    for record in records:
        for asset, version in record.lineage.items():
            if asset in latest and latest[asset].version != version:
                problems.append(f"{record.asset} was built from {asset} {version}, but the latest {asset} is "
                                f"{latest[asset].version}: re-materialise what lies below it "
                                f"({MATERIALISE} '{asset}*')")
    if problems:
        raise ArtefactMismatch(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


class RecordStore:
    """The latest record of each asset, as JSON files under one folder (written by the Dagster IO manager,
    read by the CLI and the service)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def file(self, asset: str) -> Path:
        return self.root.joinpath(*asset.split("/")).with_suffix(".json")

    def write(self, record: Record) -> None:
        from r4t_pipeline.io import atomic_file

        with atomic_file(self.file(record.asset)) as tmp:
            tmp.write_text(record.to_json())

    def read(self, asset: str) -> Record:
        path = self.file(asset)
        if not path.is_file():
            raise FileNotFoundError(f"{asset} has not been materialised: {MATERIALISE} '*{asset}' (it and "
                                    "everything it needs)")
        return Record.from_json(path.read_text(), str(path))
