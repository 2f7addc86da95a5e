import gzip
import json

import pandas as pd
import pytest

from r4t_pipeline.catalog import Catalog, CatalogError, read_generic
from r4t_pipeline.sources import DataFileMissing, load_djmix, load_polyvore
from r4t_pipeline.sources.djmix import clean_track_title


def test_polyvore_loads_every_outfit_with_item_text(polyvore_catalog):
    summary = polyvore_catalog.summary()
    # 1,497 valid + 2,463 test outfits carry item text (PROVENANCE.md counts)
    assert summary["collections"] == 3960
    assert summary["titled_collections"] == 1497
    items = polyvore_catalog.items.set_index("item_id")
    assert items.loc["148259102", "name"] == "shein sheinside khaki short sleeve pockets chunky cardigan"
    assert items.loc["148259102", "likes"] == 977
    assert items.loc["119704139_1", "name"] == "dolce gabbana silk shirt"
    assert (polyvore_catalog.items["text"].str.len() > 0).all()


def test_djmix_loads_tracks_with_reuse_counts(data_dir):
    catalog = load_djmix(data_dir, allow_download=False)
    assert len(catalog.items) == 63038 and len(catalog.collections) == 5040
    assert catalog.items["likes"].max() == 18  # the most reused track is in 18 mixes
    first = catalog.collections.iloc[0]
    assert first["item_ids"][0] == "MS4fnBfTkf0" and "Paul Oakenfold" in first["tags"]
    title = "[05] Code 61 - Drop The Deal [Limited Club Edition - LCE 003]"
    assert clean_track_title(title) == "Code 61 - Drop The Deal"


def test_generic_format_round_trips_through_csv(tmp_path):
    items = pd.DataFrame({"item_id": ["a", "b", "c"], "name": ["red dress", "", "boots"],
                          "category": ["Dresses", "Bags", ""], "likes": ["3", "", "1.5"]})
    items.to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"collection_id": ["s1"], "title": ["Date night"], "item_ids": ['["a", "b"]'],
                  "tags": ["party|evening"]}).to_csv(tmp_path / "collections.csv", index=False)
    catalog = read_generic(tmp_path, "mine")
    assert catalog.items["text"].tolist() == ["red dress (Dresses)", "Bags", "boots"]
    assert catalog.collections.loc[0, "tags"] == ["party", "evening"]
    catalog.save(tmp_path / "saved")
    again = Catalog.load(tmp_path / "saved")
    assert again.collections.loc[0, "item_ids"] == ["a", "b"]
    assert again.items["likes"].isna().tolist() == [False, True, False]


def _frames():
    items = pd.DataFrame({"item_id": ["a", "b"], "name": ["red dress", "black boots"]})
    cols = pd.DataFrame({"collection_id": ["s1"], "item_ids": [["a", "b"]]})
    return items, cols


@pytest.mark.parametrize("corrupt, message", [
    (lambda i, c: (pd.concat([i, i.iloc[[0]]]), c), "duplicate item_id 'a' at rows [0, 2]"),
    (lambda i, c: (i, pd.concat([c, c])), "duplicate collection_id 's1'"),
    (lambda i, c: (i, c.assign(item_ids=[[]])), "row 0 (collection_id='s1') has no items"),
    (lambda i, c: (i, c.assign(item_ids=[["a", "zzz"]])), "unknown item_id(s) ['zzz']"),
    (lambda i, c: (i.assign(name=["red dress", " "]), c), "row 1 (item_id='b') has no text"),
    (lambda i, c: (i.assign(likes=["many", 3]), c), "row 0 field 'likes': expected a number, got 'many'"),
    (lambda i, c: (i, c.assign(item_ids=["[a, b"])), "field 'item_ids': malformed JSON list"),
    (lambda i, c: (i, c.assign(item_ids=[7])), "field 'item_ids': expected a list, got int"),
    (lambda i, c: (i.drop(columns="item_id"), c), "missing required column(s) ['item_id']"),
])
def test_bad_catalog_input_names_file_and_record(corrupt, message):
    items, cols = corrupt(*_frames())
    with pytest.raises(CatalogError) as err:
        Catalog.from_frames("t", items, cols, source="shop.parquet")
    assert "shop.parquet" in str(err.value) and message in str(err.value)


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
    items, cols = _frames()
    good = Catalog.from_frames("t", items, cols, source="x")
    good.save(tmp_path / "catalog")
    broken = Catalog("t", items.assign(likes=[object(), object()]), cols)  # pyarrow cannot write objects
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises, the old catalog must survive
        broken.save(tmp_path / "catalog")
    assert Catalog.load(tmp_path / "catalog").items["name"].tolist() == ["red dress", "black boots"]
    assert [p.name for p in tmp_path.iterdir()] == ["catalog"]  # no temp leftovers


def test_subsample_keeps_only_used_items(polyvore_catalog):
    small = polyvore_catalog.subsample(25, seed=1)
    used = {i for ids in small.collections["item_ids"] for i in ids}
    assert len(small.collections) == 25 and set(small.items["item_id"]) == used
    small.validate("subsample")
