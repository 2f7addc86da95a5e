"""The one registry of catalogs: name -> where its data comes from (a source), how to tell cheaply that the
source changed, and where its facet vocabulary comes from.

Three kinds of source, declared in the deployment YAML (`catalogs:`):
- `builtin: polyvore | djmix`: the public datasets, read from the data directory (downloaded when allowed);
- `files: <folder>`: the generic format (`items.{parquet,csv}` + `collections.{parquet,csv}`);
- `sql: {url, items, collections, password_env, updated_at}`: a database SQLAlchemy reaches, read with polars.

Each source has two fingerprints: `change_signature()`, cheap, for a sensor tick (file sizes and mtimes; the
fingerprint query for SQL), and `data_version()`, what the catalog asset is built from (the files' content
hash; for SQL, the same fingerprint query: row counts and a hash of the ids, or max(updated_at)).
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from r4t_pipeline.catalog import Catalog, CatalogError, generic_tables
from r4t_pipeline.io import file_sha256, stable_hash
from r4t_pipeline.paths import assets_dir
from r4t_pipeline.sources import djmix, polyvore
from r4t_pipeline.sources.files import SourceFile, ensure_files

BUILTINS = {"polyvore": (polyvore.load_polyvore, polyvore.FILES), "djmix": (djmix.load_djmix, djmix.FILES)}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class SourceUnavailable(CatalogError):
    """The source did not answer (a database that refuses connections): worth trying again later."""


class CatalogSource(ABC):
    kind: str
    signature_is_data_version = False  # the cheap signature already is the data version (SQL fingerprints)

    @abstractmethod
    def load(self, name: str) -> Catalog:
        """The whole catalog, validated (CatalogError names the file/table, row and field)."""

    @abstractmethod
    def change_signature(self) -> str | None:
        """Cheap: changes whenever the source may have changed; None when the source is not there."""

    @abstractmethod
    def data_version(self) -> str:
        """What the catalog is built from: equal versions mean equal content."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """For metadata and logs (never a secret)."""


class _FileSource(CatalogSource):
    """Sources that are a fixed set of files: stat signature, then a content hash."""

    @abstractmethod
    def files(self) -> list[Path]: ...

    def change_signature(self) -> str | None:
        stats = []
        for path in self.files():
            if not path.is_file():
                return None
            stat = path.stat()
            stats.append([path.name, stat.st_size, stat.st_mtime_ns])
        return stable_hash(stats)

    def data_version(self) -> str:
        paths = self.files()
        missing = [p for p in paths if not p.is_file()]
        if missing:
            self.load_missing(missing)
        return stable_hash({p.name: file_sha256(p) for p in sorted(paths)}, length=16)

    def load_missing(self, missing: list[Path]) -> None:
        raise CatalogError(f"missing source file(s): {', '.join(map(str, missing))}")


@dataclass
class BuiltinSource(_FileSource):
    builtin: str
    data_dir: Path
    allow_download: bool = True
    kind: str = "builtin"

    def specs(self) -> list[SourceFile]:
        return BUILTINS[self.builtin][1]

    def files(self) -> list[Path]:
        return [self.data_dir / spec.domain / spec.name for spec in self.specs()]

    def load_missing(self, missing: list[Path]) -> None:
        ensure_files(self.data_dir, self.specs(), self.allow_download)  # downloads, or says what to put where

    def load(self, name: str) -> Catalog:
        return BUILTINS[self.builtin][0](self.data_dir, allow_download=self.allow_download, name=name)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "builtin": self.builtin, "data_dir": str(self.data_dir)}


@dataclass
class FolderSource(_FileSource):
    folder: Path
    kind: str = "files"

    def files(self) -> list[Path]:
        try:
            return list(generic_tables(self.folder).values())
        except CatalogError:
            return [self.folder / "items.parquet", self.folder / "collections.parquet"]  # reported missing

    def load(self, name: str) -> Catalog:
        from r4t_pipeline.catalog import read_generic

        return read_generic(self.folder, name)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "folder": str(self.folder)}


@dataclass
class SqlSource(CatalogSource):
    """Tables or queries in a database. `items`/`collections` are a table name or a SELECT; the collections
    result has either an `item_ids` column (a list, a JSON list or `a|b|c`) or one row per membership
    (`collection_id`, `item_id`, optional `position`). The password comes from the environment variable
    `password_env`, never from the configuration."""

    url: str
    items: str
    collections: str
    password_env: str | None = None
    updated_at: Mapping[str, str] = field(default_factory=dict)  # table -> timestamp column for the fingerprint
    kind: str = "sql"
    signature_is_data_version = True

    def engine(self):
        import sqlalchemy

        url = sqlalchemy.engine.make_url(self.url)
        if self.password_env:
            if self.password_env not in os.environ:
                raise CatalogError(f"catalog sql source {url.render_as_string()}: the password variable "
                                   f"${self.password_env} (sql.password_env) is not set")
            url = url.set(password=os.environ[self.password_env])
        return sqlalchemy.create_engine(url)

    def query(self, table: str) -> str:
        spec = getattr(self, table)
        return f"SELECT * FROM {spec}" if _IDENTIFIER.match(spec.strip()) else spec

    def read(self, sql: str, what: str) -> pl.DataFrame:
        import sqlalchemy

        engine = self.engine()
        try:
            try:
                connection = engine.connect()
            except sqlalchemy.exc.SQLAlchemyError as err:
                raise SourceUnavailable(f"{self.where(what)}: cannot connect: {_reason(err)}") from None
            with connection:
                return pl.read_database(sqlalchemy.text(sql), connection, infer_schema_length=None)
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise CatalogError(f"{self.where(what)}: query failed: {_reason(err)}") from None
        finally:
            engine.dispose()

    def where(self, table: str) -> str:
        """How errors name a table: the database, and the table or query the catalog's `table` comes from."""
        import sqlalchemy

        spec = getattr(self, table).strip()
        kind = "table" if _IDENTIFIER.match(spec) else "query"
        return f"{sqlalchemy.engine.make_url(self.url).render_as_string()} ({table}: {kind} {spec!r})"

    def load(self, name: str) -> Catalog:
        items = self.read(self.query("items"), "items")
        collections = self.read(self.query("collections"), "collections")
        if "item_ids" not in collections.columns and {"collection_id", "item_id"} <= set(collections.columns):
            collections = _group_memberships(collections, self.where("collections"))
        return Catalog.from_columns(name, items, collections,
                                    source={t: self.where(t) for t in ("items", "collections")})

    def change_signature(self) -> str | None:
        return self.data_version()

    def data_version(self) -> str:
        """Per table: the row count and max(<updated_at column>) when one is named, else the row count and a
        hash of the ids (new or removed rows, not edits in place: name an updated_at column for those)."""
        parts = {}
        for table, id_column in (("items", "item_id"), ("collections", "collection_id")):
            sub = f"({self.query(table)}) AS r4t_fingerprint"
            if table in self.updated_at:
                row = self.read(f"SELECT COUNT(*) AS n, MAX({self.updated_at[table]}) AS latest FROM {sub}", table)
                parts[table] = [str(v) for v in row.row(0)]
            else:
                ids = self.read(f"SELECT * FROM {sub}", table)
                keys = [c for c in (id_column, "item_id") if c in ids.columns] or ids.columns[:1]
                digest = hashlib.sha256()
                for row in sorted(ids.select(keys).cast(pl.String).iter_rows()):
                    digest.update("\x1f".join(map(str, row)).encode() + b"\x1e")
                parts[table] = [ids.height, digest.hexdigest()]
        return stable_hash(parts, length=16)

    def describe(self) -> dict[str, Any]:
        import sqlalchemy

        return {"kind": self.kind, "url": sqlalchemy.engine.make_url(self.url).render_as_string(),
                "items": self.items, "collections": self.collections}


def _reason(err: Exception) -> str:
    return " ".join(str(getattr(err, "orig", None) or err).split())


def _group_memberships(rows: pl.DataFrame, where: str) -> pl.DataFrame:
    """One row per (collection, item) -> one row per collection with its item_ids, in `position` order."""
    for column in ("collection_id", "item_id"):
        null_rows = rows[column].is_null().arg_true()
        if len(null_rows):
            raise CatalogError(f"{where}: row {int(null_rows[0])} field {column!r} is NULL")
    if "position" in rows.columns:
        rows = rows.sort(["collection_id", "position"], maintain_order=True)
    others = [c for c in rows.columns if c not in ("collection_id", "item_id", "position")]
    return rows.group_by("collection_id", maintain_order=True).agg(
        pl.col("item_id").cast(pl.String).alias("item_ids"), *[pl.col(c).first() for c in others])


@dataclass(frozen=True)
class CatalogEntry:
    """One declared catalog: its name (the asset-key prefix and group), source, facet vocabulary file (None:
    derived from the catalog itself) and size cap."""

    name: str
    source: CatalogSource
    facets_file: Path | None
    max_collections: int | None
    seed: int = 0

    def load(self) -> Catalog:
        return self.source.load(self.name).subsample(self.max_collections, self.seed)

    def facets(self, catalog: Catalog):
        from r4t_pipeline.queries import Facets

        return Facets.load(self.facets_file) if self.facets_file else Facets.derive(catalog)

    def facets_hash(self) -> str:
        return file_sha256(self.facets_file) if self.facets_file and self.facets_file.exists() else "derived"


def catalog_registry(settings) -> dict[str, CatalogEntry]:
    """Every catalog the settings declare (default: the two built-in ones), in declaration order."""
    from r4t_pipeline.sources import resolve_data_dir

    cfg = settings.catalog
    data_dir = resolve_data_dir(cfg.data_dir)
    entries = {}
    for name, declared in settings.catalogs.items():
        if declared.builtin:
            source: CatalogSource = BuiltinSource(declared.builtin, data_dir, cfg.allow_download)
            facets = assets_dir() / "facets" / f"{declared.builtin}.yaml"
        elif declared.files:
            source, facets = FolderSource(Path(os.path.expandvars(declared.files)).expanduser()), None
        else:
            sql = declared.sql
            updated = sql.updated_at if isinstance(sql.updated_at, dict) else \
                {t: sql.updated_at for t in ("items", "collections") if sql.updated_at}
            source, facets = SqlSource(sql.url, sql.items, sql.collections, sql.password_env, updated), None
        if declared.facets:
            facets = Path(os.path.expandvars(declared.facets)).expanduser()
        cap = declared.max_collections if declared.max_collections is not None else cfg.max_collections.get(name)
        entries[name] = CatalogEntry(name, source, facets, cap, cfg.seed)
    return entries
