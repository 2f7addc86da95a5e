"""Catalogs as data: a generic folder, SQLite and a real PostgreSQL enter the whole asset graph by declaration;
a database refresh is seen by the sensor's fingerprint query and rebuilds exactly that catalog's downstream;
bad rows are refused naming the table, row and column, and the previous catalog version stays intact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import sqlalchemy as sa
from test_catalog import BAD_TABLES, good_columns

from r4t_pipeline.catalog import Catalog, CatalogError
from r4t_pipeline.catalogs import SqlSource, catalog_registry
from r4t_pipeline.defs import build_definitions
from r4t_pipeline.defs.sensors import SENSOR_NAME
from r4t_pipeline.records import RecordStore
from r4t_pipeline.settings import SettingsError, load_settings

# the smoke profile with training shrunk to a few seconds: what matters here is that every asset runs
TINY = {"folm": {"sft_steps": 2,
                 "bootstrap_size": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                                    "num_layers": 1},
                 "train": {"steps": 1, "group_size": 2, "per_step_queries": 1, "max_new_tokens": 16}},
        "synth": {"samples_per_query": 2, "max_queries": 2, "max_new_tokens": 16, "chunk_queries": 2},
        "diffusion": {"train": {"steps": 2, "checkpoint_every": 1}},
        "evaluation": {"max_queries": 3, "runs": 1, "best_of_n": 2}}


@pytest.fixture(scope="module")
def sample(polyvore_catalog) -> Catalog:
    """60 real Polyvore outfits and their items, under another name."""
    small = polyvore_catalog.subsample(60, seed=5)
    return Catalog("shop", small.items, small.collections)


def write_folder(catalog: Catalog, folder: Path) -> Path:
    """The generic format as a user exports it: items as CSV, collections as Parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    catalog.items.select("item_id", "name", "category", "price", "likes").write_csv(folder / "items.csv")
    catalog.collections.select("collection_id", "title", "item_ids", "likes").write_parquet(
        folder / "collections.parquet")
    return folder


def write_database(url: str, items: dict[str, list], memberships: dict[str, list], drop: bool = True) -> None:
    """`products` (one row per item, with updated_at) and `outfit_items` (one row per membership)."""
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    types = {str: sa.Text, float: sa.Float, int: sa.Integer}
    for name, columns in (("products", items), ("outfit_items", memberships)):
        table = sa.Table(name, meta, *[sa.Column(c, types[type(next((v for v in vs if v is not None), ""))])
                                       for c, vs in columns.items()])
        with engine.begin() as conn:
            if drop:
                table.drop(conn, checkfirst=True)
                table.create(conn)
            rows = [dict(zip(columns, row)) for row in zip(*columns.values())]
            if rows:
                conn.execute(table.insert(), rows)
    engine.dispose()


def database_rows(catalog: Catalog, updated_at: int = 1) -> tuple[dict[str, list], dict[str, list]]:
    items = catalog.items
    products = {"id": items["item_id"].to_list(), "title": items["name"].to_list(),
                "category": items["category"].to_list(), "price": items["price"].to_list(),
                "updated_at": [updated_at] * items.height}
    memberships = {"collection_id": [], "item_id": [], "position": [], "title": []}
    for cid, title, ids in catalog.collections.select("collection_id", "title", "item_ids").iter_rows():
        for position, item in enumerate(ids):
            for column, value in zip(memberships, (cid, item, position, title)):
                memberships[column].append(value)
    return products, memberships


def sql_declaration(url: str, **extra) -> dict:
    return {"sql": {"url": url, "items": "select id as item_id, title as name, category, price, updated_at "
                                         "from products", "collections": "outfit_items",
                    "updated_at": {"items": "updated_at"}, **extra}}


def settings_for(root: Path, catalogs: dict, **changes):
    return load_settings("smoke", config_path=os.devnull,
                         overrides={**TINY, "work_dir": str(root), "catalogs": catalogs, **changes})


def materialise_graph(settings) -> dg.ExecuteInProcessResult:
    defs = build_definitions(settings)
    return dg.materialize(list(defs.assets) + list(defs.asset_checks), resources=defs.resources,
                          instance=dg.DagsterInstance.ephemeral())


# ---- declarations ------------------------------------------------------------------------------------------

def test_declared_catalogs_replace_the_built_in_two(tmp_path):
    settings = settings_for(tmp_path, {"shop": {"files": str(tmp_path / "shop")}, "polyvore": {"builtin": "polyvore"}})
    assert list(catalog_registry(settings)) == ["shop", "polyvore"]
    assert list(load_settings("smoke", config_path=os.devnull).catalogs) == ["polyvore", "djmix"]
    with pytest.raises(SettingsError, match="exactly one source"):
        settings_for(tmp_path, {"shop": {"files": "a", "builtin": "djmix"}})
    with pytest.raises(SettingsError, match="must start with a letter"):
        settings_for(tmp_path, {"my-shop": {"files": "a"}})
    with pytest.raises(SettingsError, match="the URL holds a password"):
        settings_for(tmp_path, {"db": sql_declaration("postgresql+psycopg2://u:secret@h/db")})


def test_the_password_comes_from_the_environment_only(tmp_path, monkeypatch):
    source = SqlSource("postgresql+psycopg2://shop@127.0.0.1:9/shop", "products", "outfit_items",
                       password_env="R4T_TEST_PW")  # an engine connects only when used
    monkeypatch.delenv("R4T_TEST_PW", raising=False)
    with pytest.raises(CatalogError, match=r"the password variable \$R4T_TEST_PW \(sql.password_env\) is not set"):
        source.engine()
    monkeypatch.setenv("R4T_TEST_PW", "s3cret")
    assert source.engine().url.password == "s3cret" and "s3cret" not in json.dumps(source.describe())


# ---- whole graph for a folder and an SQLite catalog ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["files", "sqlite"])
def test_a_declared_catalog_materialises_the_whole_graph(kind, sample, tmp_path):
    if kind == "files":
        declaration = {"files": str(write_folder(sample, tmp_path / "export"))}
    else:
        url = f"sqlite:///{tmp_path / 'shop.db'}"
        write_database(url, *database_rows(sample))
        declaration = sql_declaration(url)
    settings = settings_for(tmp_path / "work", {"shop": declaration})
    result = materialise_graph(settings)
    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    keys = {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    assert {"shop/catalog", "shop/oar/evaluation", "shop/wscr/evaluation", "evaluation_report"} <= keys
    store = RecordStore(settings.records_dir)
    built = Catalog.load(store.read("shop/catalog").path)
    assert built.name == "shop" and built.collections.height == 60
    assert sorted(built.items["item_id"].to_list()) == sorted(sample.items["item_id"].to_list())
    meta = {m.asset_key.to_user_string(): m.materialization.metadata for m in result.get_asset_materialization_events()}
    assert meta["shop/broad_queries"]["facets"].value == "derived"  # no facet file: the catalog's own words
    assert "title" in json.dumps(meta["shop/broad_queries"]["wscr_sources"].value)
    report = (Path(store.read("evaluation_report").path) / "report.md").read_text()
    assert "## shop · OAR" in report and "## shop · WSCR" in report


# ---- every bad-input case of the generic format, through the SQL path -------------------------------------------

@pytest.mark.parametrize("corrupt, table, message", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_bad_rows_in_a_database_name_table_row_and_column(corrupt, table, message, tmp_path):
    items, collections = corrupt(*good_columns())
    url = f"sqlite:///{tmp_path / 'bad.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for name, columns in (("items", items), ("collections", collections)):
            conn.execute(sa.text(f"CREATE TABLE {name} ({', '.join(columns)})"))  # untyped: SQLite keeps any value
            rows = [{c: json.dumps(v) if isinstance(v, list) else v for c, v in zip(columns, row)}
                    for row in zip(*columns.values())]
            if rows:
                conn.execute(sa.text(f"INSERT INTO {name} VALUES ({', '.join(f':{c}' for c in columns)})"), rows)
    engine.dispose()
    with pytest.raises(CatalogError) as err:
        SqlSource(url, "items", "collections").load("t")
    assert str(err.value).startswith(f"{url} ({table}: table '{table}'): ") and message in str(err.value)


# ---- database refresh: the sensor, then the new catalog version ----------------------------------------------------

def refresh_flow(url: str, sample: Catalog, root: Path) -> None:
    """Materialise the catalog from the database, change rows, and check what the sensor asks and builds."""
    products, memberships = database_rows(sample)
    write_database(url, products, memberships)
    settings = settings_for(root, {"shop": sql_declaration(url), "polyvore": {"builtin": "polyvore"}})
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    catalog_key = dg.AssetKey(["shop", "catalog"])
    assert dg.materialize(list(defs.assets), selection=[catalog_key], resources=defs.resources,
                          instance=instance).success
    store = RecordStore(settings.records_dir)
    first = store.read("shop/catalog")

    sensor = defs.get_sensor_def(SENSOR_NAME)

    def tick(cursor):
        return sensor.evaluate_tick(dg.build_sensor_context(cursor=cursor, definitions=defs, instance=instance))

    baseline = tick(None)
    assert baseline.run_requests == [] and tick(baseline.cursor).skip_message == "catalog sources unchanged"

    # one new item in one new outfit, and an edit in place (a new updated_at)
    new_item = {"id": ["new-1"], "title": ["emerald velvet blazer"], "category": ["Blazers"], "price": [89.0],
                "updated_at": [2]}
    write_database(url, new_item, {"collection_id": ["pv-new"], "item_id": ["new-1"], "position": [0],
                                   "title": ["Holiday party"]}, drop=False)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        edited = products["id"][0]
        conn.execute(sa.text("UPDATE products SET title = 'renamed item', updated_at = 3 WHERE id = :id"),
                     {"id": edited})
    engine.dispose()
    changed = tick(baseline.cursor)
    [request] = changed.run_requests
    selected = {k.to_user_string() for k in request.asset_selection}
    downstream = {k.to_user_string() for k in dg.AssetSelection.assets(catalog_key).downstream().resolve(defs.assets)}
    assert selected == downstream and not any(s.startswith("polyvore/") for s in selected)
    assert request.tags["r4t/catalog"] == "shop"

    assert dg.materialize(list(defs.assets), selection=[catalog_key], resources=defs.resources,
                          instance=instance).success
    second = store.read("shop/catalog")
    assert second.version != first.version and second.collections == first.collections + 1
    built = Catalog.load(second.path)
    texts = built.item_texts()
    assert texts["new-1"] == "emerald velvet blazer (Blazers)" and texts[edited].startswith("renamed item")
    assert Path(first.path).is_dir()  # the earlier version is kept (retention)

    # bad rows: a duplicate id and a NULL name; the run fails naming the table, row and column
    write_database(url, {"id": [edited], "title": [None], "category": [""], "price": [1.0], "updated_at": [4]},
                   {"collection_id": [], "item_id": [], "position": [], "title": []}, drop=False)
    failed = dg.materialize(list(defs.assets), selection=[catalog_key], resources=defs.resources,
                            instance=instance, raise_on_error=False)
    assert not failed.success
    [failure] = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.event_specific_data.error.cause.message
    assert "(items: query 'select id as item_id" in message and f"duplicate item_id {edited!r}" in message
    assert store.read("shop/catalog") == second and Catalog.load(second.path).item_texts() == texts


def test_a_sqlite_refresh_rebuilds_exactly_that_catalog(sample, tmp_path):
    refresh_flow(f"sqlite:///{tmp_path / 'shop.db'}", sample, tmp_path / "work")


def test_a_postgres_refresh_rebuilds_exactly_that_catalog(postgres, sample, tmp_path):
    refresh_flow(postgres.url, sample, tmp_path / "work")


def test_a_membership_table_keeps_the_curated_order(tmp_path):
    url = f"sqlite:///{tmp_path / 'order.db'}"
    write_database(url, {"id": ["a", "b", "c"], "title": ["x", "y", "z"]},
                   {"collection_id": ["s", "s", "s"], "item_id": ["c", "a", "b"], "position": [2, 0, 1],
                    "title": ["t", "t", "t"]})
    catalog = SqlSource(url, "select id as item_id, title as name from products", "outfit_items").load("t")
    assert catalog.collections["item_ids"][0].to_list() == ["a", "b", "c"]
    assert pl.Series(catalog.collections["title"]).to_list() == ["t"]
