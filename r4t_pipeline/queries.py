"""Broad-query corpora for the two regimes (R4T Appendix C).

OAR:  open-ended intents with no ground truth: cleaned real collection titles (or, for DJ mixes, their
      real genre-tag combinations) plus multi-template generation from facet vocabularies; deduplicated;
      split 8:1:1 by a fixed seed.
WSCR: (query, reference item set) pairs, one per real collection: its real title where it has one,
      otherwise a concise query derived from its items (an LLM when configured, else a keyword summary).
      Identical query texts stay in one split, so no query leaks from train into validation or test.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.io import atomic_dir
from r4t_pipeline.paths import assets_dir

SPLITS = ("train", "val", "test")
_WORD = re.compile(r"[a-z][a-z'&-]*")
_DATE_PREFIX = re.compile(r"^\s*\d{4}(-\d{2}){0,2}\s*-\s*")


@dataclass(frozen=True)
class Facets:
    nouns: list[str]
    stopwords: frozenset[str]
    facets: dict[str, list[str]]
    templates: dict[str, list[str]]
    genres: list[str]

    @classmethod
    def load(cls, domain: str, path: Path | None = None) -> Facets:
        path = path or assets_dir() / "facets" / f"{domain}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"no facet vocabulary for domain {domain!r} at {path}")
        raw = yaml.safe_load(path.read_text())
        return cls(raw["nouns"], frozenset(raw.get("stopwords", [])), raw["facets"], raw["templates"],
                   raw.get("genres", []))


def normalize_query(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("’", "'")))


def clean_title(title: str, stopwords: frozenset[str], min_words: int = 2, max_words: int = 8) -> str:
    """A real title as a broad query: lower-cased words only; '' when too short, too long or stopwords only."""
    words = normalize_query(_DATE_PREFIX.sub("", title)).split()
    if not (min_words <= len(words) <= max_words) or all(w in stopwords for w in words):
        return ""
    return " ".join(words)


def template_queries(facets: Facets, max_queries: int, seed: int) -> pd.DataFrame:
    """Fill every template family in turn (round robin), so each family is represented under a cap."""
    rng = random.Random(seed)
    families = {}
    for family, templates in facets.templates.items():
        filled = {_fill(t, facets, rng) for t in templates for _ in range(max(4, max_queries // len(templates)))}
        families[family] = sorted(filled)
        rng.shuffle(families[family])
    rows = [{"query": q, "source": f"template:{family}"}
            for group in itertools.zip_longest(*[[(f, q) for q in qs] for f, qs in families.items()])
            for family, q in (g for g in group if g is not None)]
    return pd.DataFrame(rows[:max_queries] if max_queries else rows, columns=["query", "source"])


def _fill(template: str, facets: Facets, rng: random.Random) -> str:
    values = {name: rng.choice(options) for name, options in facets.facets.items()}
    values["noun"] = rng.choice(facets.nouns)
    if facets.genres:
        values["genre"], values["genre2"] = rng.sample(facets.genres, 2)
    return normalize_query(template.format(**values))


def title_queries(catalog: Catalog, facets: Facets) -> pd.DataFrame:
    """Real intents from the catalog: outfit titles, or a DJ mix's genre tags ("deep house and techno mix")."""
    if facets.genres:
        genres = set(facets.genres)
        texts = [_genre_phrase([t.lower() for t in tags if t.lower() in genres], facets.nouns[0])
                 for tags in catalog.collections["tags"]]
    else:
        texts = [clean_title(t, facets.stopwords) for t in catalog.collections["title"]]
    return pd.DataFrame({"query": [t for t in texts if t], "source": "title"})


def _genre_phrase(genres: list[str], noun: str) -> str:
    genres = list(dict.fromkeys(genres))[:3]
    if not genres:
        return ""
    listed = " and ".join([", ".join(genres[:-1]), genres[-1]] if len(genres) > 1 else genres)
    return normalize_query(f"{listed} {noun}")


def split_labels(n: int, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Random 8:1:1 assignment of n units (queries or query groups) to train/val/test."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    labels = np.empty(n, dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train:n_train + n_val]] = "val"
    labels[order[n_train + n_val:]] = "test"
    return labels


def build_oar_queries(catalog: Catalog, facets: Facets, max_template_queries: int, max_title_queries: int | None,
                      seed: int) -> pd.DataFrame:
    titles = title_queries(catalog, facets).drop_duplicates("query")
    if max_title_queries is not None:
        titles = titles.sample(n=min(max_title_queries, len(titles)), random_state=seed)
    queries = pd.concat([titles, template_queries(facets, max_template_queries, seed)], ignore_index=True)
    queries = queries.drop_duplicates("query").reset_index(drop=True)
    queries["split"] = split_labels(len(queries), seed)
    queries.insert(0, "query_id", [f"{catalog.domain}-oar-{i:06d}" for i in range(len(queries))])
    return queries


def keyword_summary(item_texts: list[str], facets: Facets, catalog_df: Counter[str], n_words: int = 3) -> str:
    """An offline stand-in for the paper's LLM-written set description: the set's most repeated content
    words, ties broken towards words common in the whole catalog (colours, materials, styles; not brands)."""
    counts = Counter(w for text in item_texts for w in set(normalize_query(text).split())
                     if w not in facets.stopwords and len(w) > 2)
    words: list[str] = []
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], -catalog_df[kv[0]], kv[0])):
        if not any(_stem(word) == _stem(chosen) for chosen in words):
            words.append(word)
    return " ".join([*words[:n_words], facets.nouns[0]]) if words else ""


def _stem(word: str) -> str:
    """Enough to treat 'dress'/'dresses' and 'bag'/'bags' as one word."""
    if word.endswith("es") and len(word) > 4:
        return word[:-2]
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def document_frequency(texts: list[str]) -> Counter[str]:
    return Counter(w for text in texts for w in set(normalize_query(text).split()))


QueryWriter = Callable[[list[str]], str]


def build_wscr_queries(catalog: Catalog, facets: Facets, seed: int, max_pairs: int | None = None,
                       query_writer: QueryWriter | None = None) -> pd.DataFrame:
    """One (query, reference set) pair per collection; `query_writer` (e.g. an LLM) names untitled sets."""
    cols = catalog.collections
    if max_pairs is not None and len(cols) > max_pairs:
        cols = cols.sample(n=max_pairs, random_state=seed).sort_index()
    text_of = dict(zip(catalog.items["item_id"], catalog.items["text"]))
    catalog_df = document_frequency(list(text_of.values()))
    rows = []
    for cid, title, tags, ids in zip(cols["collection_id"], cols["title"], cols["tags"], cols["item_ids"]):
        query, source = clean_title(title, facets.stopwords), "title"
        if facets.genres and query:
            genres = [t.lower() for t in tags if t.lower() in set(facets.genres)]
            query = normalize_query(" ".join([*genres[:2], query]))
        if not query:
            texts = [text_of[i] for i in ids]
            query, source = (query_writer(texts), "llm") if query_writer else ("", "")
            if not query:  # no model configured, or it wrote nothing usable
                query, source = keyword_summary(texts, facets, catalog_df), "keywords"
        if query:
            rows.append({"collection_id": cid, "query": normalize_query(query), "source": source,
                         "reference_ids": list(ids)})
    pairs = pd.DataFrame(rows, columns=["collection_id", "query", "source", "reference_ids"])
    groups = pairs["query"].astype("category").cat.codes.to_numpy()
    pairs["split"] = split_labels(int(groups.max()) + 1 if len(groups) else 0, seed)[groups]
    pairs.insert(0, "query_id", [f"{catalog.domain}-wscr-{i:06d}" for i in range(len(pairs))])
    return pairs


def split_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {s: int((frame["split"] == s).sum()) for s in SPLITS}


def save_corpus(path: Path, oar: pd.DataFrame, wscr: pd.DataFrame) -> None:
    with atomic_dir(path) as tmp:
        oar.to_parquet(tmp / "oar.parquet", index=False)
        wscr.to_parquet(tmp / "wscr.parquet", index=False)


def load_corpus(path: Path, regime: str, split: str | None = None) -> pd.DataFrame:
    file = Path(path) / f"{regime}.parquet"
    if not file.exists():
        raise FileNotFoundError(f"no {regime} queries at {file}; materialise the broad_queries asset first")
    frame = pd.read_parquet(file)
    if "reference_ids" in frame:
        frame["reference_ids"] = frame["reference_ids"].map(list)
    return frame if split is None else frame[frame["split"] == split].reset_index(drop=True)
