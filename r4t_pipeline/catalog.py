"""The generic catalog format every later stage consumes, its validation, and Parquet storage (polars).

A catalog is two tables:
- items:       item_id (str, unique, non-empty), name (str), category (str), text (str, what E_c embeds),
               price (float, null = unknown), likes (float, null = unknown), image_path (str, optional)
- collections: collection_id (str, unique, non-empty), title (str, may be empty), item_ids (list[str],
               non-empty, distinct, each an item_id), likes, views (float, null = unknown), tags (list[str]),
               description (str), source_split (str)
Bring your own catalog as `items.{parquet,csv}` + `collections.{parquet,csv}` (CSV: `item_ids` and
`tags` as JSON lists or `|`-separated strings); see `read_generic`. Every refusal names the source, the
table, the row and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from r4t_pipeline.io import atomic_dir

ITEM_COLUMNS = {"item_id": "str", "name": "str", "category": "str", "text": "str",
                "price": "float", "likes": "float", "image_path": "str"}
COLLECTION_COLUMNS = {"collection_id": "str", "title": "str", "item_ids": "list", "likes": "float",
                      "views": "float", "tags": "list", "description": "str", "source_split": "str"}
REQUIRED_ITEM_COLUMNS = ("item_id", "name")
REQUIRED_COLLECTION_COLUMNS = ("collection_id", "item_ids")
_POLARS_TYPES = {"str": pl.String, "float": pl.Float64, "list": pl.List(pl.String)}


class CatalogError(ValueError):
    """Bad catalog input; the message names the file (or table), the row and the field."""


def item_text(name: str, category: str) -> str:
    """What E_c embeds for an item without an explicit text: its name, then its category."""
    name, category = name.strip(), category.strip()
    return f"{name} ({category})" if name and category and category.lower() not in name.lower() else name or category


@dataclass
class Catalog:
    name: str
    items: pl.DataFrame
    collections: pl.DataFrame

    @classmethod
    def from_columns(cls, name: str, items: Mapping[str, Sequence] | pl.DataFrame,
                     collections: Mapping[str, Sequence] | pl.DataFrame, source: str | Mapping[str, str]) -> Catalog:
        """Coerce types, fill optional columns and validate. `source` names the input in every error: one name
        for both tables, or {"items": ..., "collections": ...} (e.g. their two files)."""
        where = table_sources(source)
        items = _conform(_as_columns(items), ITEM_COLUMNS, REQUIRED_ITEM_COLUMNS, where["items"])
        collections = _conform(_as_columns(collections), COLLECTION_COLUMNS, REQUIRED_COLLECTION_COLUMNS,
                               where["collections"])
        items["text"] = [text.strip() or item_text(n, c)
                         for text, n, c in zip(items["text"], items["name"], items["category"])]
        catalog = cls(name, _frame(items, ITEM_COLUMNS), _frame(collections, COLLECTION_COLUMNS))
        catalog.validate(source)
        return catalog

    @classmethod
    def from_rows(cls, name: str, items: Iterable[dict], collections: Iterable[dict],
                  source: str | Mapping[str, str]) -> Catalog:
        return cls.from_columns(name, _rows_to_columns(items, ITEM_COLUMNS), _rows_to_columns(collections,
                                                                                           COLLECTION_COLUMNS), source)

    def validate(self, source: str | Mapping[str, str]) -> None:
        items, cols, sources = self.items, self.collections, table_sources(source)
        for table, frame, column in (("items", items, "item_id"), ("collections", cols, "collection_id")):
            where = sources[table]
            if frame.height == 0:
                raise CatalogError(f"{where}: the table is empty; a catalog needs at least one row")
            ids = frame[column].to_list()
            empty = [row for row, value in enumerate(ids) if not value.strip()]
            if empty:
                raise CatalogError(f"{where}: row {empty[0]} field {column!r} is empty ({len(empty)} such rows)")
            _no_duplicates(ids, where, column)
        missing_text = [row for row, text in enumerate(items["text"].to_list()) if not text.strip()]
        if missing_text:
            row = missing_text[0]
            raise CatalogError(f"{sources['items']}: row {row} (item_id={items['item_id'][row]!r}) has no text: "
                               f"give it a name, category or text ({len(missing_text)} such rows)")
        known = set(items["item_id"].to_list())
        for row, (cid, ids) in enumerate(zip(cols["collection_id"].to_list(), cols["item_ids"].to_list())):
            where = f"{sources['collections']}: row {row} (collection_id={cid!r})"
            if len(ids) == 0:
                raise CatalogError(f"{where} has no items")
            dangling = [i for i in ids if i not in known]
            if dangling:
                raise CatalogError(f"{where} refers to unknown item_id(s) {dangling[:5]}")
            repeated = [i for i, n in Counter(ids).items() if n > 1]
            if repeated:
                raise CatalogError(f"{where} field 'item_ids' lists item(s) {repeated[:5]} more than once")

    def save(self, path: str | Path, extra_meta: dict | None = None) -> None:
        with atomic_dir(path) as tmp:
            self.items.write_parquet(tmp / "items.parquet")
            self.collections.write_parquet(tmp / "collections.parquet")
            meta = {"name": self.name, **self.summary(), "content_hash": self.content_hash(), **(extra_meta or {})}
            (tmp / "catalog.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        if not (path / "items.parquet").exists():
            raise FileNotFoundError(f"no catalog at {path}; materialise the catalog asset first")
        meta = json.loads((path / "catalog.json").read_text())
        return cls(meta["name"], pl.read_parquet(path / "items.parquet"),
                   pl.read_parquet(path / "collections.parquet"))

    def summary(self) -> dict:
        sizes = self.collections["item_ids"].list.len()
        return {"items": self.items.height, "collections": self.collections.height,
                "titled_collections": int((self.collections["title"].str.strip_chars() != "").sum()),
                "items_per_collection_median": float(sizes.median()) if len(sizes) else 0.0,
                "categories": int(self.items["category"].n_unique())}

    def content_hash(self) -> str:
        """Hash of both tables' content (row order included): the catalog's data version."""
        digest = hashlib.sha256()
        for frame in (self.items, self.collections):
            digest.update(frame.write_ndjson().encode())
        return digest.hexdigest()[:16]

    def subsample(self, max_collections: int | None, seed: int) -> Catalog:
        """Keep `max_collections` collections (fixed seed, source order) and only the items they use."""
        if max_collections is None or self.collections.height <= max_collections:
            return self
        keep = np.sort(np.random.default_rng(seed).permutation(self.collections.height)[:max_collections])
        collections = self.collections[keep.tolist()]
        used = set(collections["item_ids"].explode().to_list())
        return Catalog(self.name, self.items.filter(pl.col("item_id").is_in(list(used))), collections)

    def item_texts(self) -> dict[str, str]:
        return dict(zip(self.items["item_id"].to_list(), self.items["text"].to_list()))


def table_sources(source: str | Mapping[str, str]) -> dict[str, str]:
    """How errors name each table: '<source> (items)' for one shared name, else the given per-table names."""
    if isinstance(source, str):
        return {"items": f"{source} (items)", "collections": f"{source} (collections)"}
    return {"items": source["items"], "collections": source["collections"]}


def _as_columns(table: Mapping[str, Sequence] | pl.DataFrame) -> dict[str, list]:
    if isinstance(table, pl.DataFrame):
        return {name: table[name].to_list() for name in table.columns}
    return {name: list(values) for name, values in table.items()}


def _rows_to_columns(rows: Iterable[dict], schema: dict[str, str]) -> dict[str, list]:
    rows = list(rows)
    names = list(dict.fromkeys([*schema, *(k for row in rows for k in row)]))
    present = [n for n in names if any(n in row for row in rows)]
    return {name: [row.get(name) for row in rows] for name in present}


def _frame(columns: dict[str, list], schema: dict[str, str]) -> pl.DataFrame:
    return pl.DataFrame({name: columns[name] for name in schema},
                        schema={name: _POLARS_TYPES[kind] for name, kind in schema.items()})


def _conform(columns: dict[str, list], schema: dict[str, str], required: tuple[str, ...], source: str
             ) -> dict[str, list]:
    missing = [c for c in required if c not in columns]
    if missing:
        raise CatalogError(f"{source}: missing required column(s) {missing}; found {list(columns)}")
    n_rows = len(columns[required[0]])
    out = {}
    for col, kind in schema.items():
        values = columns.get(col, [None] * n_rows)
        out[col] = [_coerce(v, kind, source, row, col) for row, v in enumerate(values)]
    return out


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _coerce(value, kind: str, source: str, row: int, col: str):
    if kind == "str":
        if _is_missing(value):
            return ""
        if isinstance(value, (str, int, np.integer)):
            return str(value)
        raise CatalogError(f"{source}: row {row} field {col!r}: expected a string, "
                           f"got {type(value).__name__} {value!r}")
    if kind == "float":
        if _is_missing(value) or value == "":
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CatalogError(f"{source}: row {row} field {col!r}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise CatalogError(f"{source}: row {row} field {col!r}: expected a finite number, got {value!r}")
        return number
    if isinstance(value, str):
        value = _parse_list(value, source, row, col)
    if isinstance(value, (list, tuple, np.ndarray, pl.Series)):
        return [str(v) for v in value]
    if _is_missing(value):
        return []
    raise CatalogError(f"{source}: row {row} field {col!r}: expected a list, got {type(value).__name__} {value!r}")


def _parse_list(text: str, source: str, row: int, col: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise CatalogError(f"{source}: row {row} field {col!r}: malformed JSON list ({err.msg})") from None
        if not isinstance(parsed, list):
            raise CatalogError(f"{source}: row {row} field {col!r}: expected a JSON list")
        return parsed
    return [part.strip() for part in text.split("|") if part.strip()]


def _no_duplicates(ids: list[str], source: str, column: str) -> None:
    counts = Counter(ids)
    duplicated = [i for i, n in counts.items() if n > 1]
    if duplicated:
        first = duplicated[0]
        rows = [row for row, value in enumerate(ids) if value == first]
        raise CatalogError(f"{source}: duplicate {column} {first!r} at rows {rows} ({len(duplicated)} duplicated ids)")


def read_table(path: Path) -> dict[str, list]:
    """A table file as columns of raw values: Parquet through polars, CSV row by row so that a row with
    more or fewer fields than the header is refused with its line number."""
    if path.suffix == ".parquet":
        try:
            return _as_columns(pl.read_parquet(path))
        except (OSError, pl.exceptions.PolarsError) as err:
            raise CatalogError(f"{path}: cannot read table ({err})") from None
    if path.suffix == ".csv" or path.name.endswith(".csv.gz"):
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise CatalogError(f"{path}: cannot read table ({err})") from None
        if not rows:
            raise CatalogError(f"{path}: the file is empty; expected a header line")
        header, body = rows[0], rows[1:]
        for line, row in enumerate(body, start=2):
            if len(row) != len(header):
                raise CatalogError(f"{path}: line {line} (row {line - 2}) has {len(row)} fields, the header has "
                                   f"{len(header)} ({', '.join(header)})")
        return {name: [row[i] for row in body] for i, name in enumerate(header)}
    raise CatalogError(f"{path}: unsupported table format; use .parquet or .csv")


def generic_tables(directory: str | Path) -> dict[str, Path]:
    """The items and collections files of a generic-format folder."""
    directory = Path(directory)
    tables = {}
    for name in ("items", "collections"):
        found = [p for p in (directory / f"{name}.parquet", directory / f"{name}.csv") if p.exists()]
        if not found:
            raise CatalogError(f"{directory}: no {name}.parquet or {name}.csv (the generic catalog format)")
        tables[name] = found[0]
    return tables


def read_generic(directory: str | Path, name: str) -> Catalog:
    """Load a user catalog from `items.{parquet,csv}` and `collections.{parquet,csv}` in `directory`."""
    tables = generic_tables(directory)
    # each table is named by its own file, so an error blames the file it is in
    return Catalog.from_columns(name, read_table(tables["items"]), read_table(tables["collections"]),
                                source={table: str(path) for table, path in tables.items()})
