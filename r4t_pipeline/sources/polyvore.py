"""Polyvore outfits (Han et al., ACM MM 2017): the official validation split with every field, and the
official test split with item names (Polyvore-T, Wang et al. 2019), joined to fine categories."""

from __future__ import annotations

import re
from pathlib import Path

from r4t_pipeline.catalog import Catalog, CatalogError
from r4t_pipeline.sources.files import SourceFile, ensure_files, expect, read_json

_GH = "https://raw.githubusercontent.com"
FILES = [
    SourceFile("polyvore", "valid_no_dup.json.gz",
               f"{_GH}/Bingurrr/polyvore/21cf4a11cf48d234bef7576ba8d694273788e269/data/label/valid_no_dup.json",
               "official validation outfits with every field (Apache-2.0)"),
    SourceFile("polyvore", "mcn_polyvoreT_test_names.json.gz",
               f"{_GH}/WangXin93/fashion_compatibility_mcn/d817fbd8179a6181934ffe62ffd89465d764417d/"
               "data/test_no_dup_with_category_3more_name.json",
               "official test outfits with item names (MIT)"),
    SourceFile("polyvore", "ngnn_test_categories.json.gz",
               f"{_GH}/CRIPAC-DIG/NGNN/554585c42d50b4f4b5c26da33269e73f11c2e3cc/data/test_no_dup_new_100.json",
               "category ids of the test outfits' items"),
    SourceFile("polyvore", "category_id.txt",
               f"{_GH}/xthan/polyvore-dataset/ba8aa71b6589e8920d172a8b5df84746be724d00/category_id.txt",
               "category id -> name (Apache-2.0); stored gzip-compressed or plain"),
]
_TID = re.compile(r"[?&]tid=(\d+)")


def load_polyvore(data_dir: Path, allow_download: bool = True, name: str = "polyvore") -> Catalog:
    paths = ensure_files(data_dir, FILES, allow_download)
    categories = _read_categories(paths["category_id.txt"])
    valid_items, valid_sets = _valid_split(paths["valid_no_dup.json.gz"], categories)
    test_items, test_sets = _test_split(paths["mcn_polyvoreT_test_names.json.gz"],
                                        paths["ngnn_test_categories.json.gz"], categories)
    items = list({item["item_id"]: item for item in reversed(valid_items + test_items)}.values())[::-1]  # first wins
    return Catalog.from_rows(name, items, valid_sets + test_sets, source=str(data_dir / "polyvore"))


def _read_categories(path: Path) -> dict[int, str]:
    text = path.read_bytes()
    if text[:2] == b"\x1f\x8b":
        import gzip

        text = gzip.decompress(text)
    categories = {}
    for line_no, line in enumerate(text.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cid, _, name = line.strip().partition(" ")
        if not cid.isdigit() or not name:
            raise CatalogError(f"{path}: line {line_no}: expected '<id> <category name>', got {line!r}")
        categories[int(cid)] = name.strip()
    return categories


def _valid_split(path: Path, categories: dict[int, str]) -> tuple[list[dict], list[dict]]:
    outfits = read_json(path)
    expect(isinstance(outfits, list), path, "top level", "expected a list of outfits")
    items, sets = [], []
    for n, outfit in enumerate(outfits):
        record = f"outfit {n} (set_id={outfit.get('set_id') if isinstance(outfit, dict) else None!r})"
        expect(isinstance(outfit, dict) and isinstance(outfit.get("items"), list), path, record,
               "expected an object with an 'items' list")
        expect(outfit.get("set_id") not in (None, ""), path, record, "has no 'set_id'")
        ids = []
        for item in outfit["items"]:
            match = _TID.search(str(item.get("image", "")))
            expect(match is not None, path, record, f"item {item.get('index')} has no tid= in its image URL")
            name = str(item.get("name") or "").strip()
            category = categories.get(int(item.get("categoryid", -1)), "")
            if not (name or category):
                continue  # a handful of real items carry neither: nothing to embed
            price = item.get("price")
            items.append({"item_id": match.group(1), "name": name, "category": category,
                          "price": None if price in (None, -1) else price, "likes": item.get("likes")})
            ids.append(match.group(1))
        sets.append({"collection_id": f"pv{outfit['set_id']}", "title": str(outfit.get("name") or "").strip(),
                     "item_ids": list(dict.fromkeys(ids)), "likes": outfit.get("likes"), "views": outfit.get("views"),
                     "description": outfit.get("desc") or "", "source_split": "valid"})
    return items, sets


def _test_split(names_path: Path, categories_path: Path, categories: dict[int, str]) -> tuple[list[dict], list[dict]]:
    outfits = read_json(names_path)
    expect(isinstance(outfits, dict), names_path, "top level", "expected {set_id: {slot: {index, name}}}")
    fine = {}
    for n, row in enumerate(read_json(categories_path)):
        expect(isinstance(row, dict) and len(row.get("items_index", [])) == len(row.get("items_category", [])),
               categories_path, f"record {n}", "items_index and items_category must be lists of equal length")
        fine.update({(str(row["set_id"]), int(i)): int(c) for i, c in zip(row["items_index"], row["items_category"])})
    items, sets = [], []
    for set_id, slots in outfits.items():
        expect(isinstance(slots, dict), names_path, f"set_id={set_id!r}", "expected {slot: {index, name}}")
        ids = []
        for slot, item in slots.items():
            expect(isinstance(item, dict) and "index" in item, names_path, f"set_id={set_id!r} slot {slot!r}",
                   "expected {index, name}")
            name = str(item.get("name") or "").strip()
            category = categories.get(fine.get((set_id, int(item["index"])), -1), slot)
            item_id = f"{set_id}_{item['index']}"  # the official per-outfit item id (FITB convention)
            items.append({"item_id": item_id, "name": name, "category": category})
            ids.append(item_id)
        sets.append({"collection_id": f"pv{set_id}", "title": "", "item_ids": ids, "source_split": "test"})
    return items, sets
