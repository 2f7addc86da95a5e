import gzip
import json

import polars as pl
import pytest

from r4t_pipeline.catalog import Catalog, CatalogError, read_generic
from r4t_pipeline.sources import DataFileMissing, load_djmix, load_polyvore
from r4t_pipeline.sources.djmix import clean_track_title


def test_polyvore_loads_every_outfit_with_item_text(polyvore_catalog):
    summary = polyvore_catalog.summary()
    # 1,497 valid + 2,463 test outfits carry item text (PROVENANCE.md counts)
    assert summary["collections"] == 3960
    assert summary["titled_collections"] == 1497
    items = {row["item_id"]: row for row in polyvore_catalog.items.iter_rows(named=True)}
    assert items["148259102"]["name"] == "shein sheinside khaki short sleeve pockets chunky cardigan"
    assert items["148259102"]["likes"] == 977
    assert items["119704139_1"]["name"] == "dolce gabbana silk shirt"
    assert (polyvore_catalog.items["text"].str.len_chars() > 0).all()


def test_djmix_loads_tracks_with_reuse_counts(data_dir):
    catalog = load_djmix(data_dir, allow_download=False)
    assert catalog.items.height == 63038 and catalog.collections.height == 5040
    assert catalog.items["likes"].max() == 18  # the most reused track is in 18 mixes
    first = catalog.collections.row(0, named=True)
    assert first["item_ids"][0] == "MS4fnBfTkf0" and "Paul Oakenfold" in first["tags"]
    title = "[05] Code 61 - Drop The Deal [Limited Club Edition - LCE 003]"
    assert clean_track_title(title) == "Code 61 - Drop The Deal"


def test_generic_format_round_trips_through_csv(tmp_path):
    pl.DataFrame({"item_id": ["a", "b", "c"], "name": ["red dress", "", "boots"],
                  "category": ["Dresses", "Bags", ""], "likes": ["3", "", "1.5"]}).write_csv(tmp_path / "items.csv")
    pl.DataFrame({"collection_id": ["s1"], "title": ["Date night"], "item_ids": ['["a", "b"]'],
                  "tags": ["party|evening"]}).write_csv(tmp_path / "collections.csv")
    catalog = read_generic(tmp_path, "mine")
    assert catalog.items["text"].to_list() == ["red dress (Dresses)", "Bags", "boots"]
    assert catalog.collections["tags"][0].to_list() == ["party", "evening"]
    catalog.save(tmp_path / "saved")
    again = Catalog.load(tmp_path / "saved")
    assert again.name == "mine" and again.collections["item_ids"][0].to_list() == ["a", "b"]
    assert again.items["likes"].is_null().to_list() == [False, True, False]


def good_columns():
    return {"item_id": ["a", "b"], "name": ["red dress", "black boots"]}, \
        {"collection_id": ["s1"], "item_ids": [["a", "b"]]}


def _with(columns: dict, **changes) -> dict:
    return {k: v for k, v in {**columns, **changes}.items() if v is not None}


# every way a generic table can be wrong: (corrupt, the table it is in, the words the refusal must contain)
BAD_TABLES = {
    "duplicate item": (lambda i, c: (_with(i, item_id=["a", "a"]), c), "items", "duplicate item_id 'a' at rows [0, 1]"),
    "duplicate collection": (lambda i, c: (i, {"collection_id": ["s1", "s1"], "item_ids": [["a"], ["b"]]}),
                             "collections", "duplicate collection_id 's1'"),
    "empty collection": (lambda i, c: (i, _with(c, item_ids=[[]])), "collections",
                         "row 0 (collection_id='s1') has no items"),
    "dangling item": (lambda i, c: (i, _with(c, item_ids=[["a", "zzz"]])), "collections",
                      "unknown item_id(s) ['zzz']"),
    "repeated item": (lambda i, c: (i, _with(c, item_ids=[["a", "b", "a"]])), "collections",
                      "row 0 (collection_id='s1') field 'item_ids' lists item(s) ['a'] more than once"),
    "no text": (lambda i, c: (_with(i, name=["red dress", " "]), c), "items", "row 1 (item_id='b') has no text"),
    "null text": (lambda i, c: (_with(i, name=["red dress", None]), c), "items", "row 1 (item_id='b') has no text"),
    "not a number": (lambda i, c: (_with(i, likes=["many", 3]), c), "items",
                     "row 0 field 'likes': expected a number, got 'many'"),
    "infinite number": (lambda i, c: (_with(i, price=[1.0, float("inf")]), c), "items",
                        "row 1 field 'price': expected a finite number"),
    "malformed list": (lambda i, c: (i, _with(c, item_ids=["[a, b"])), "collections",
                       "row 0 field 'item_ids': malformed JSON list"),
    "not a list": (lambda i, c: (i, _with(c, item_ids=[7])), "collections",
                   "row 0 field 'item_ids': expected a list, got int"),
    "missing column": (lambda i, c: (_with(i, item_id=None), c), "items", "missing required column(s) ['item_id']"),
    "empty id": (lambda i, c: (_with(i, item_id=["a", " "]), c), "items", "row 1 field 'item_id' is empty"),
    "no items": (lambda i, c: ({"item_id": [], "name": []}, c), "items", "the table is empty"),
    "no collections": (lambda i, c: (i, {"collection_id": [], "item_ids": []}), "collections", "the table is empty"),
}


@pytest.mark.parametrize("corrupt, table, message", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_bad_catalog_input_names_file_and_record(corrupt, table, message):
    items, cols = corrupt(*good_columns())
    with pytest.raises(CatalogError) as err:
        Catalog.from_columns("t", items, cols, source="shop.parquet")
    assert str(err.value).startswith(f"shop.parquet ({table}): ") and message in str(err.value)


def test_a_csv_row_with_an_extra_or_a_missing_field_is_refused_with_its_line(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,name\na,red dress\nb,black boots,extra\n")
    (tmp_path / "collections.csv").write_text('collection_id,item_ids\ns1,a|b\n')
    with pytest.raises(CatalogError, match=r"items.csv: line 3 \(row 1\) has 3 fields, the header has 2"):
        read_generic(tmp_path, "t")
    (tmp_path / "items.csv").write_text("item_id,name\na,red dress\nb,black boots\n")
    (tmp_path / "collections.csv").write_text("collection_id,item_ids\ns1\n")
    with pytest.raises(CatalogError, match=r"collections.csv: line 2 \(row 0\) has 1 fields, the header has 2"):
        read_generic(tmp_path, "t")


def test_a_generic_table_error_names_the_file_it_is_in(tmp_path):
    pl.DataFrame({"item_id": ["a", "a"], "name": ["x", "y"]}).write_parquet(tmp_path / "items.parquet")
    pl.DataFrame({"collection_id": ["s1"], "item_ids": [["a"]]}).write_parquet(tmp_path / "collections.parquet")
    with pytest.raises(CatalogError, match=f"^{tmp_path / 'items.parquet'}: duplicate item_id 'a'"):
        read_generic(tmp_path, "t")


def _polyvore_dir(tmp_path, data_dir):
    folder = tmp_path / "polyvore"
    folder.mkdir()
    for f in (data_dir / "polyvore").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_malformed_source_json_names_file_and_position(tmp_path, data_dir):
    folder = _polyvore_dir(tmp_path, data_dir)
    (folder / "valid_no_dup.json.gz").write_bytes(gzip.compress(b'[{"name": "x", "items": [}]'))
    with pytest.raises(CatalogError, match=r"valid_no_dup.json.gz: malformed JSON at line 1 column 26"):
        load_polyvore(tmp_path, allow_download=False)


def test_wrong_types_in_source_name_the_record(tmp_path, data_dir):
    folder = _polyvore_dir(tmp_path, data_dir)
    (folder / "valid_no_dup.json.gz").write_bytes(gzip.compress(json.dumps(
        [{"set_id": "42", "name": "x", "items": "not a list"}]).encode()))
    with pytest.raises(CatalogError, match=r"outfit 0 \(set_id='42'\): expected an object with an 'items' list"):
        load_polyvore(tmp_path, allow_download=False)


def test_missing_source_files_say_what_to_put_where(tmp_path):
    with pytest.raises(DataFileMissing) as err:
        load_djmix(tmp_path, allow_download=False)
    text = str(err.value)
    assert str(tmp_path / "djmix" / "djmix-dataset.json.gz") in text and "R4T_DATA_DIR" in text
    assert "mir-aidj/djmix-dataset" in text


def test_failed_save_keeps_the_previous_catalog(tmp_path):
    items, cols = good_columns()
    good = Catalog.from_columns("t", items, cols, source="x")
    good.save(tmp_path / "catalog")
    broken = Catalog("t", pl.DataFrame({"likes": [object(), object()]}, schema={"likes": pl.Object}), good.collections)
    with pytest.raises(Exception):  # noqa: B017 - whatever the writer raises, the old catalog must survive
        broken.save(tmp_path / "catalog")
    assert Catalog.load(tmp_path / "catalog").items["name"].to_list() == ["red dress", "black boots"]
    assert [p.name for p in tmp_path.iterdir()] == ["catalog"]  # no temp leftovers


def test_subsample_keeps_only_used_items(polyvore_catalog):
    small = polyvore_catalog.subsample(25, seed=1)
    used = set(small.collections["item_ids"].explode().to_list())
    assert small.collections.height == 25 and set(small.items["item_id"].to_list()) == used
    small.validate("subsample")
