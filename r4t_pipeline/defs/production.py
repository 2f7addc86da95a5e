"""One materialisation of an asset: its version (from its code version and its inputs' versions), the immutable
version folder it writes (`r4t_pipeline.layout`), reuse of an identical earlier version, and the Dagster
output (record, data version, metadata). Every asset of the graph goes through here."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from r4t_pipeline.catalogs import SourceUnavailable
from r4t_pipeline.io import atomic_dir, process_alive, stable_hash, write_json
from r4t_pipeline.layout import ArtefactStore, version_of
from r4t_pipeline.records import Record
from r4t_pipeline.settings import Settings

CODE_REVISION = "2"  # bump when an asset's code changes what it produces
# Errors worth one more try: a source or service that did not answer. Anything else (a bug, bad data, an
# interrupt) fails the step at once; the training stages resume from their checkpoints when run again.
TRANSIENT_ERRORS = (ConnectionError, TimeoutError, SourceUnavailable)
_METADATA_TYPES = {"MarkdownMetadataValue": dg.MetadataValue.md, "PathMetadataValue": dg.MetadataValue.path,
                   "IntMetadataValue": dg.MetadataValue.int, "FloatMetadataValue": dg.MetadataValue.float,
                   "TextMetadataValue": dg.MetadataValue.text, "JsonMetadataValue": dg.MetadataValue.json}


def code_version(*parts: object) -> str:
    return f"{CODE_REVISION}-{stable_hash([str(p) for p in parts])}"


def retry_transient(compute):
    """Asset compute functions: a transient error asks Dagster for a retry; nothing else is retried."""
    @functools.wraps(compute)
    def wrapper(*args, **kwargs):
        try:
            return compute(*args, **kwargs)
        except TRANSIENT_ERRORS as err:
            raise dg.RetryRequested(max_retries=2, seconds_to_wait=10) from err
    return wrapper


def reap_abandoned_runs(context: dg.AssetExecutionContext, markers: Path) -> list[str]:
    """Mark failed the STARTED runs of this host whose process is gone (killed with no chance to say so):
    each run leaves a marker with its process id when its first asset starts."""
    host = socket.gethostname()
    markers.mkdir(parents=True, exist_ok=True)
    mine = markers / f"{context.run.run_id}.json"
    if not mine.exists():
        write_json(mine, {"host": host, "pid": os.getpid()})
    reaped = []
    for marker in markers.glob("*.json"):
        if marker == mine:
            continue
        owner, run = json.loads(marker.read_text()), context.instance.get_run_by_id(marker.stem)
        if run is not None and not run.is_finished:
            if owner["host"] != host or process_alive(owner["pid"]):
                continue
            reason = f"run {run.run_id} was killed: its process {owner['pid']} is gone (seen by {context.run.run_id})"
            context.instance.report_run_failed(run, message=reason)
            reaped.append(run.run_id)
        marker.unlink(missing_ok=True)
    return reaped


class Production:
    def __init__(self, context: dg.AssetExecutionContext, settings: Settings, inputs: Mapping[str, Record],
                 content: str | None = None):
        """`content`: for a root asset (the catalog), the hash of what it is built from."""
        self.key = list(context.asset_key.path)
        self.asset, self.catalog = "/".join(self.key), self.key[0]
        code = context.assets_def.code_versions_by_key[context.asset_key]
        parts = {r.asset: r.version for r in inputs.values()} | ({"content": content} if content else {})
        self.lineage = Record.lineage_of(inputs.values())
        self.version = version_of(code, parts)
        self.store = ArtefactStore(settings.root, settings.retention)
        self.path = self.store.version_dir(self.key, self.version)
        self.sidecar = self.path.with_name(f"{self.version}.json")
        self.store.prepare(self.key, self.version)
        reap_abandoned_runs(context, settings.root / ".runs")
        self.log = context.log

    def reuse(self) -> dg.Output | None:
        """The Output of an identical version built earlier, when it is still there."""
        if not (self.path.is_dir() and self.sidecar.is_file()):
            return None
        saved = json.loads(self.sidecar.read_text())
        record = Record.from_json(saved["record"], str(self.sidecar))
        self.log.info(f"{self.asset}: version {self.version} exists (built from the same inputs); reusing it")
        return self._output(record, {**_decode(saved["metadata"]), "reused": True})

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A temp folder that becomes this version's folder when the block succeeds."""
        with atomic_dir(self.path, replace=False) as tmp:
            yield tmp

    def record(self, cls: type[Record], **fields) -> Record:
        return cls(asset=self.asset, catalog=self.catalog, path=str(self.path), version=self.version,
                   lineage=self.lineage, **fields)

    def output(self, record: Record, metadata: dict[str, Any]) -> dg.Output:
        write_json(self.sidecar, {"record": record.to_json(), "metadata": _encode(metadata)})
        for old in self.store.retire(self.key, keep=self.path):
            old.with_name(f"{old.name}.json").unlink(missing_ok=True)
        return self._output(record, {**metadata, "reused": False})

    def _output(self, record: Record, metadata: dict[str, Any]) -> dg.Output:
        return dg.Output(record, data_version=dg.DataVersion(record.version),
                         metadata={**metadata, "version": record.version, "path": dg.MetadataValue.path(record.path)})


def _encode(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: {"dagster": type(v).__name__, "value": v.value} if isinstance(v, dg.MetadataValue) else v
            for k, v in metadata.items()}


def _decode(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: _METADATA_TYPES[v["dagster"]](v["value"]) if isinstance(v, dict) and "dagster" in v else v
            for k, v in metadata.items()}


def preview(frame: pl.DataFrame, columns: list[str], n: int = 8, width: int = 60) -> dg.MetadataValue:
    """The first rows of a table as Markdown (lists joined, long cells cut)."""
    def cell(value) -> str:
        text = ", ".join(map(str, value[:4])) if isinstance(value, list) else str(value)
        return (text[:width] + "…" if len(text) > width else text).replace("|", "/")

    rows = [f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
    rows += [f"| {' | '.join(cell(v) for v in row)} |" for row in frame.head(n).select(columns).iter_rows()]
    return dg.MetadataValue.md("\n".join(rows))


def write_result(production: Production, name: str, payload: dict) -> None:
    """A JSON result (an evaluation, a benchmark) as this version's only file."""
    with production.writing() as tmp:
        write_json(tmp / name, payload)
