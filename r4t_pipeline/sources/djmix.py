"""The DJ Mix Dataset (Kim et al., DAFx 2022): human-curated DJ sets of identified tracks."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.sources.files import SourceFile, ensure_files, expect, read_json

FILES = [SourceFile("djmix", "djmix-dataset.json.gz",
                    "https://raw.githubusercontent.com/mir-aidj/djmix-dataset/"
                    "e32d179b8529156202566aabaa14bbd344a62d5b/dataset/djmix-dataset.json",
                    "5,040 DJ mixes with tracklists (also in the PyPI wheel djmix==0.3.1 at "
                    "dataset/djmix-dataset.json.gz)")]
_TIMESTAMP = re.compile(r"^\s*\[[^\]]*\]\s*")        # "[05] Artist - Title"
_LABEL = re.compile(r"\s*\[[^\]]*\]\s*$")            # "Artist - Title [Label - CAT 003]"


def clean_track_title(title: str) -> str:
    return _LABEL.sub("", _TIMESTAMP.sub("", title)).strip()


def load_djmix(data_dir: Path, allow_download: bool = True, name: str = "djmix") -> Catalog:
    path = ensure_files(data_dir, FILES, allow_download)["djmix-dataset.json.gz"]
    mixes = read_json(path)
    expect(isinstance(mixes, list), path, "top level", "expected a list of mixes")
    names: dict[str, str] = {}
    reuse: Counter[str] = Counter()
    sets = []
    for n, mix in enumerate(mixes):
        record = f"mix {n} (id={mix.get('id') if isinstance(mix, dict) else None!r})"
        expect(isinstance(mix, dict) and isinstance(mix.get("tracklist"), list), path, record,
               "expected an object with a 'tracklist' list")
        expect(mix.get("id") not in (None, ""), path, record, "has no 'id' (every mix needs a stable id)")
        ids = []
        for track in mix["tracklist"]:
            expect(isinstance(track, dict), path, record, f"tracklist entry {track!r} is not an object")
            track_name = clean_track_title(str(track.get("title") or ""))
            if not track.get("id") or not track_name:
                continue  # unidentified entries have no stable id to retrieve
            names.setdefault(track["id"], track_name)
            ids.append(track["id"])
        ids = list(dict.fromkeys(ids))
        reuse.update(ids)
        tags = [str(t.get("key", "")).removeprefix("Category:") for t in mix.get("tags") or [] if isinstance(t, dict)]
        sets.append({"collection_id": str(mix["id"]), "title": str(mix.get("title") or "").strip(), "item_ids": ids,
                     "tags": tags, "views": mix.get("num_identified_tracks"), "source_split": "all"})
    items = [{"item_id": i, "name": n, "likes": float(reuse[i])}  # reuse count: how many DJs played it
             for i, n in names.items()]
    return Catalog.from_rows(name, items, [s for s in sets if s["item_ids"]], source=str(path))
