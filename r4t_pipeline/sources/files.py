"""Where source files live, how they are fetched for users with network, and how they are read."""

from __future__ import annotations

import gzip
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from r4t_pipeline.catalog import CatalogError
from r4t_pipeline.io import atomic_file

DATA_DIR_ENV = "R4T_DATA_DIR"


class DataFileMissing(FileNotFoundError):
    """A source file is absent and could not be downloaded; the message says what to put where."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a public dataset: its name in the data directory and its public address."""

    domain: str
    name: str          # stored gzip-compressed, as in the shared data directory
    url: str           # the raw upstream file (not compressed)
    description: str


def resolve_data_dir(configured: str | os.PathLike | None = None) -> Path:
    """The config field wins, then $R4T_DATA_DIR, then ./data."""
    return Path(configured or os.environ.get(DATA_DIR_ENV) or "data").expanduser().resolve()


def ensure_files(data_dir: Path, files: list[SourceFile], allow_download: bool) -> dict[str, Path]:
    """Paths of the files in `data_dir/<domain>/`, downloading any that are missing when allowed."""
    paths, missing = {}, []
    for spec in files:
        path = data_dir / spec.domain / spec.name
        if not path.exists() and allow_download:
            _try_download(spec, path)
        (paths.__setitem__(spec.name, path) if path.exists() else missing.append(spec))
    if missing:
        listing = "\n".join(f"  {data_dir / s.domain / s.name}   <- {s.url} (gzip it), {s.description}"
                            for s in missing)
        raise DataFileMissing(f"missing source data in {data_dir} (set ${DATA_DIR_ENV} or the data_dir config "
                              f"field to the folder that holds them); put these files there:\n{listing}")
    return paths


def _try_download(spec: SourceFile, path: Path, timeout: float = 30) -> None:
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response:
            payload = response.read()
    except OSError:
        return  # offline: the caller reports every missing file at once
    with atomic_file(path) as tmp:
        tmp.write_bytes(gzip.compress(payload))


def read_json(path: Path):
    """JSON from a .json or .json.gz file; malformed content names the file and position."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise CatalogError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise CatalogError(f"{path}: cannot read ({err})") from None


def expect(condition: bool, path: Path, record: str, message: str) -> None:
    if not condition:
        raise CatalogError(f"{path}: {record}: {message}")
