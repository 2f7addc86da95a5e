"""Build a real third catalog in the generic format from Debian's package index: items are packages (name,
short description, section), collections are the metapackages that Debian's teams curate, the Pure Blends
tasks (science-chemistry, med-bio, education-astronomy, gis-workstation, ...) and tasksel's task-* packages,
each titled by its description ("Debian Science Chemistry packages") and holding what it depends on and
recommends.

    apt-get update && apt-cache dumpavail > /tmp/Packages
    python scripts/debian_catalog.py /tmp/Packages /srv/data/debian [--sqlite /srv/data/debian.db]

then declare it in the deployment YAML: `catalogs: {debian: {files: /srv/data/debian}}` (or the `sql:` form
for the SQLite copy, see the README)."""

from __future__ import annotations

import argparse
import re
import sqlite3
from pathlib import Path

import polars as pl

BLENDS = re.compile(r"^(science|med|education|gis|junior|astro|games|multimedia|design|debichem|hamradio|edu|task)-")
_ALTERNATIVES = re.compile(r"\s*\|\s*")
_VERSION = re.compile(r"\s*\(.*?\)|:any|\s*\[.*?\]")


def parse_packages(text: str) -> dict[str, dict[str, str]]:
    """`Packages` stanzas (deb822) -> package name -> fields (the first stanza of a name wins)."""
    packages: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            packages.setdefault(fields["Package"], fields)
    return packages


def members(fields: dict[str, str], known: dict) -> list[str]:
    """What a metapackage depends on and recommends: the first known alternative of each, in order."""
    picked = []
    for relation in (fields.get("Depends", ""), fields.get("Recommends", "")):
        for clause in filter(None, (c.strip() for c in relation.split(","))):
            options = [_VERSION.sub("", o).strip() for o in _ALTERNATIVES.split(clause)]
            choice = next((o for o in options if o in known and not BLENDS.match(o)
                           and not o.endswith(("-config", "-tasks"))), None)
            if choice and choice not in picked:
                picked.append(choice)
    return picked


def build(packages: dict[str, dict[str, str]], min_items: int = 3) -> tuple[pl.DataFrame, pl.DataFrame]:
    collections = []
    for name, fields in sorted(packages.items()):
        if BLENDS.match(name) and (items := members(fields, packages)) and len(items) >= min_items:
            collections.append({"collection_id": name, "title": fields.get("Description", "").split("\n")[0],
                                "item_ids": "|".join(items), "tags": fields.get("Source", "")})
    used = sorted({i for c in collections for i in c["item_ids"].split("|")})
    items = [{"item_id": i, "name": f"{i}: {packages[i].get('Description', '').splitlines()[0]}",
              "category": packages[i].get("Section", "").split("/")[-1]} for i in used]
    return pl.DataFrame(items), pl.DataFrame(collections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", type=Path, help="a Packages file, e.g. from `apt-cache dumpavail`")
    parser.add_argument("out", type=Path, help="folder for items.csv and collections.csv")
    parser.add_argument("--sqlite", type=Path, help="also write the tables (products, outfits) to this SQLite file")
    args = parser.parse_args()
    items, collections = build(parse_packages(args.packages.read_text(encoding="utf-8", errors="replace")))
    args.out.mkdir(parents=True, exist_ok=True)
    items.write_csv(args.out / "items.csv")
    collections.write_csv(args.out / "collections.csv")
    if args.sqlite:
        with sqlite3.connect(args.sqlite) as db:
            for table, frame in (("packages", items), ("metapackages", collections)):
                db.execute(f"DROP TABLE IF EXISTS {table}")
                db.execute(f"CREATE TABLE {table} ({', '.join(frame.columns)})")
                db.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * frame.width)})", frame.iter_rows())
    print(f"{items.height} packages in {collections.height} curated metapackages -> {args.out}")


if __name__ == "__main__":
    main()
