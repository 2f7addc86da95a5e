"""The generic catalog format every later stage consumes, its validation, and Parquet storage.

A catalog is two tables:
- items:       item_id (str, unique), name (str), category (str), text (str, what E_c embeds),
               price (float, NaN = unknown), likes (float, NaN = unknown), image_path (str, optional)
- collections: collection_id (str, unique), title (str, may be empty), item_ids (list[str], non-empty,
               each an item_id), likes, views (float, NaN = unknown), tags (list[str]),
               description (str), source_split (str)
Bring your own catalog as `items.{parquet,csv}` + `collections.{parquet,csv}` (CSV: `item_ids` and
`tags` as JSON lists or `|`-separated strings); see `read_generic`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from r4t_pipeline.io import atomic_dir

ITEM_COLUMNS = {"item_id": "str", "name": "str", "category": "str", "text": "str",
                "price": "float", "likes": "float", "image_path": "str"}
COLLECTION_COLUMNS = {"collection_id": "str", "title": "str", "item_ids": "list", "likes": "float",
                      "views": "float", "tags": "list", "description": "str", "source_split": "str"}
REQUIRED_ITEM_COLUMNS = ("item_id", "name")
REQUIRED_COLLECTION_COLUMNS = ("collection_id", "item_ids")


class CatalogError(ValueError):
    """Bad catalog input; the message names the file and the record."""


def item_text(name: str, category: str) -> str:
    """What E_c embeds for an item without an explicit text: its name, then its category."""
    name, category = name.strip(), category.strip()
    return f"{name} ({category})" if name and category and category.lower() not in name.lower() else name or category


@dataclass
class Catalog:
    domain: str
    items: pd.DataFrame
    collections: pd.DataFrame

    @classmethod
    def from_frames(cls, domain: str, items: pd.DataFrame, collections: pd.DataFrame, source: str) -> Catalog:
        """Fill optional columns, coerce types and validate; `source` names the input in errors."""
        items = _conform(items, ITEM_COLUMNS, REQUIRED_ITEM_COLUMNS, f"{source} (items)")
        collections = _conform(collections, COLLECTION_COLUMNS, REQUIRED_COLLECTION_COLUMNS, f"{source} (collections)")
        empty_text = items["text"].str.strip() == ""
        items.loc[empty_text, "text"] = [item_text(n, c) for n, c in
                                         zip(items.loc[empty_text, "name"], items.loc[empty_text, "category"])]
        catalog = cls(domain, items.reset_index(drop=True), collections.reset_index(drop=True))
        catalog.validate(source)
        return catalog

    def validate(self, source: str) -> None:
        items, cols = self.items, self.collections
        _no_duplicates(items["item_id"], f"{source} (items)", "item_id")
        _no_duplicates(cols["collection_id"], f"{source} (collections)", "collection_id")
        missing_text = np.flatnonzero(items["text"].str.strip() == "")
        if len(missing_text):
            row = int(missing_text[0])
            raise CatalogError(f"{source} (items): row {row} (item_id={items['item_id'][row]!r}) has no text: "
                               f"give it a name, category or text ({len(missing_text)} such rows)")
        known = set(items["item_id"])
        for row, (cid, ids) in enumerate(zip(cols["collection_id"], cols["item_ids"])):
            if len(ids) == 0:
                raise CatalogError(f"{source} (collections): row {row} (collection_id={cid!r}) has no items")
            dangling = [i for i in ids if i not in known]
            if dangling:
                raise CatalogError(f"{source} (collections): row {row} (collection_id={cid!r}) refers to "
                                   f"unknown item_id(s) {dangling[:5]}")

    def save(self, path: str | Path, extra_meta: dict | None = None) -> None:
        with atomic_dir(path) as tmp:
            self.items.to_parquet(tmp / "items.parquet", index=False)
            self.collections.to_parquet(tmp / "collections.parquet", index=False)
            meta = {"domain": self.domain, **self.summary(), **(extra_meta or {})}
            (tmp / "catalog.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        if not (path / "items.parquet").exists():
            raise FileNotFoundError(f"no catalog at {path}; materialise the catalog asset first")
        meta = json.loads((path / "catalog.json").read_text())
        items = pd.read_parquet(path / "items.parquet")
        collections = pd.read_parquet(path / "collections.parquet")
        for col in ("item_ids", "tags"):
            collections[col] = collections[col].map(list)
        return cls(meta["domain"], items, collections)

    def summary(self) -> dict:
        sizes = self.collections["item_ids"].map(len)
        return {"items": len(self.items), "collections": len(self.collections),
                "titled_collections": int((self.collections["title"].str.strip() != "").sum()),
                "items_per_collection_median": float(sizes.median()) if len(sizes) else 0.0,
                "categories": int(self.items["category"].nunique())}

    def subsample(self, max_collections: int | None, seed: int) -> Catalog:
        """Keep `max_collections` collections (fixed seed) and only the items they use."""
        if max_collections is None or len(self.collections) <= max_collections:
            return self
        keep = self.collections.sample(n=max_collections, random_state=seed).sort_index()
        used = {i for ids in keep["item_ids"] for i in ids}
        items = self.items[self.items["item_id"].isin(used)]
        return Catalog(self.domain, items.reset_index(drop=True), keep.reset_index(drop=True))


def _conform(frame: pd.DataFrame, schema: dict[str, str], required: tuple[str, ...], source: str) -> pd.DataFrame:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise CatalogError(f"{source}: missing required column(s) {missing}; found {list(frame.columns)}")
    frame = frame.copy()
    for col, kind in schema.items():
        if col not in frame.columns:
            frame[col] = [[] for _ in range(len(frame))] if kind == "list" else (np.nan if kind == "float" else "")
        frame[col] = [_coerce(v, kind, source, row, col) for row, v in enumerate(frame[col])]
        if kind == "float":
            frame[col] = frame[col].astype("float64")
    return frame[list(schema)]


def _coerce(value, kind: str, source: str, row: int, col: str):
    if kind == "str":
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        if isinstance(value, (str, int, np.integer)):
            return str(value)
        raise CatalogError(f"{source}: row {row} field {col!r}: expected a string, "
                           f"got {type(value).__name__} {value!r}")
    if kind == "float":
        if value is None or value == "":
            return np.nan
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CatalogError(f"{source}: row {row} field {col!r}: expected a number, got {value!r}") from None
    if isinstance(value, str):
        value = _parse_list(value, source, row, col)
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    if value is None or (isinstance(value, float) and np.isnan(value)):
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


def _no_duplicates(ids: pd.Series, source: str, column: str) -> None:
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        rows = [int(r) for r in np.flatnonzero(ids.to_numpy() == first)]
        raise CatalogError(f"{source}: duplicate {column} {first!r} at rows {rows} ({dup.nunique()} duplicated ids)")


def read_table(path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv" or path.name.endswith(".csv.gz"):
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise CatalogError(f"{path}: cannot read table ({err})") from None
    raise CatalogError(f"{path}: unsupported table format; use .parquet or .csv")


def read_generic(directory: str | Path, domain: str) -> Catalog:
    """Load a user catalog from `items.{parquet,csv}` and `collections.{parquet,csv}` in `directory`."""
    directory = Path(directory)
    tables = {}
    for name in ("items", "collections"):
        found = [p for p in (directory / f"{name}.parquet", directory / f"{name}.csv") if p.exists()]
        if not found:
            raise CatalogError(f"{directory}: no {name}.parquet or {name}.csv (the generic catalog format)")
        tables[name] = read_table(found[0])
    return Catalog.from_frames(domain, tables["items"], tables["collections"], source=str(directory))
