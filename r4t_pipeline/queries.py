"""Broad-query corpora for the two regimes (R4T Appendix C), as polars tables.

OAR:  open-ended intents with no ground truth: cleaned real collection titles (or, for DJ mixes, their
      real genre-tag combinations) plus multi-template generation from facet vocabularies (a YAML file, or
      facets derived from the catalog itself: its categories and frequent descriptive words); deduplicated;
      split 8:1:1 by a fixed seed.
WSCR: (query, reference item set) pairs, one per real collection: its real title where it has one, else an
      LLM's description of its items when a writer is configured, else a keyword summary of its items.
      Validation and test queries are human-written (titles) or LLM-written only: keyword summaries are
      built from the reference items' own words, so they leak the answer and stay in the training split.
      Identical query texts stay in one split. Each pair records its leakage: the share of its query words
      found in the reference items' texts.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from r4t_pipeline.catalog import Catalog
from r4t_pipeline.io import atomic_dir

SPLITS = ("train", "val", "test")
EVALUATION_SOURCES = ("title", "llm")  # WSCR sources that may be validation/test queries
_WORD = re.compile(r"[a-z][a-z'&-]*")
_DATE_PREFIX = re.compile(r"^\s*\d{4}(-\d{2}){0,2}\s*-\s*")
# Function words every derived vocabulary drops (a facet file names its own stopwords).
_COMMON_STOPWORDS = frozenset("""a an the and or of for with in on to by at is it you i me my this that from your
our new set size one two part vol feat ft pres presents""".split())
DERIVED_TEMPLATES = {"descriptive": ["{word} {noun}", "{word} and {word2} {noun}", "{word} {word2} {noun}"],
                     "category": ["{word} {category}", "{category} {noun}", "{word} {category} {noun}"]}


@dataclass(frozen=True)
class Facets:
    nouns: list[str]
    stopwords: frozenset[str]
    facets: dict[str, list[str]]
    templates: dict[str, list[str]]
    genres: list[str]
    origin: str  # the facet file, or "derived"

    @classmethod
    def load(cls, path: Path) -> Facets:
        if not path.exists():
            raise FileNotFoundError(f"no facet vocabulary at {path}")
        raw = yaml.safe_load(path.read_text())
        return cls(raw["nouns"], frozenset(raw.get("stopwords", [])), raw["facets"], raw["templates"],
                   raw.get("genres", []), str(path))

    @classmethod
    def derive(cls, catalog: Catalog, n_words: int = 60, n_categories: int = 30) -> Facets:
        """Facets from the catalog itself: its most common categories and the descriptive words (in at least
        two items' texts, not function words, not category names) that the most items share."""
        categories = [c for c, _ in Counter(c for c in catalog.items["category"].to_list() if c.strip())
                      .most_common(n_categories)]
        category_words = {w for c in categories for w in normalize_query(c).split()}
        frequency = document_frequency(catalog.items["text"].to_list())
        words = [w for w, n in frequency.most_common() if n >= 2 and len(w) > 2 and w not in _COMMON_STOPWORDS
                 and w not in category_words][:n_words]
        facets = {"word": words, "word2": words}
        templates = {"descriptive": DERIVED_TEMPLATES["descriptive"]}
        if categories:
            facets["category"] = [normalize_query(c) for c in categories]
            templates["category"] = DERIVED_TEMPLATES["category"]
        return cls(["collection"], _COMMON_STOPWORDS, facets, templates if words else {}, [], "derived")


def normalize_query(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("’", "'")))


def clean_title(title: str, stopwords: frozenset[str], min_words: int = 2, max_words: int = 8) -> str:
    """A real title as a broad query: lower-cased words only; '' when too short, too long or stopwords only."""
    words = normalize_query(_DATE_PREFIX.sub("", title)).split()
    if not (min_words <= len(words) <= max_words) or all(w in stopwords for w in words):
        return ""
    return " ".join(words)


def template_queries(facets: Facets, max_queries: int, seed: int) -> pl.DataFrame:
    """Fill every template family in turn (round robin), so each family is represented under a cap."""
    rng = random.Random(seed)
    families = {}
    for family, templates in facets.templates.items():
        filled = {_fill(t, facets, rng) for t in templates for _ in range(max(4, max_queries // len(templates)))}
        families[family] = sorted(q for q in filled if q)
        rng.shuffle(families[family])
    rows = [(q, f"template:{family}")
            for group in itertools.zip_longest(*[[(f, q) for q in qs] for f, qs in families.items()])
            for family, q in (g for g in group if g is not None)]
    rows = rows[:max_queries] if max_queries else rows
    return pl.DataFrame(rows, schema={"query": pl.String, "source": pl.String}, orient="row")


def _fill(template: str, facets: Facets, rng: random.Random) -> str:
    values = {name: rng.choice(options) for name, options in facets.facets.items() if options}
    values["noun"] = rng.choice(facets.nouns)
    if facets.genres:
        values["genre"], values["genre2"] = rng.sample(facets.genres, 2)
    words = normalize_query(template.format(**values)).split()
    return "" if len(set(words)) < len(words) else " ".join(words)  # "black and black" is not a query


def title_queries(catalog: Catalog, facets: Facets) -> pl.DataFrame:
    """Real intents from the catalog: outfit titles, or a DJ mix's genre tags ("deep house and techno mix")."""
    if facets.genres:
        genres = set(facets.genres)
        texts = [_genre_phrase([t.lower() for t in tags if t.lower() in genres], facets.nouns[0])
                 for tags in catalog.collections["tags"].to_list()]
    else:
        texts = [clean_title(t, facets.stopwords) for t in catalog.collections["title"].to_list()]
    return pl.DataFrame({"query": [t for t in texts if t]}, schema={"query": pl.String}).with_columns(
        source=pl.lit("title"))


def _genre_phrase(genres: list[str], noun: str) -> str:
    genres = list(dict.fromkeys(genres))[:3]
    if not genres:
        return ""
    listed = " and ".join([", ".join(genres[:-1]), genres[-1]] if len(genres) > 1 else genres)
    return normalize_query(f"{listed} {noun}")


def split_labels(n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Random assignment of n units (queries or query groups) to train/val/test in the given proportions."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    labels = np.empty(n, dtype=object)
    labels[order[:n_train]] = "train"
    labels[order[n_train:n_train + n_val]] = "val"
    labels[order[n_train + n_val:]] = "test"
    return labels


def build_oar_queries(catalog: Catalog, facets: Facets, max_template_queries: int, max_title_queries: int | None,
                      seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> pl.DataFrame:
    titles = title_queries(catalog, facets).unique("query", keep="first", maintain_order=True)
    if max_title_queries is not None and titles.height > max_title_queries:
        titles = titles[np.sort(np.random.default_rng(seed).permutation(titles.height)[:max_title_queries]).tolist()]
    queries = pl.concat([titles, template_queries(facets, max_template_queries, seed)])
    queries = queries.unique("query", keep="first", maintain_order=True)
    return queries.with_columns(split=pl.Series(split_labels(queries.height, seed, fractions).tolist(),
                                                dtype=pl.String)).with_row_index("n").select(
        query_id=pl.format(f"{catalog.name}-oar-{{}}", pl.col("n").cast(pl.String).str.zfill(6)),
        query=pl.col("query"), source=pl.col("source"), split=pl.col("split"))


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


def leakage(query: str, reference_texts: list[str], facets: Facets) -> float:
    """Share of the query's content words (not stopwords or the facet nouns) that occur in the reference
    items' texts: near 1 for a query built from the answer's own words."""
    words = [w for w in normalize_query(query).split() if w not in facets.stopwords and w not in facets.nouns]
    if not words:
        return 0.0
    reference = {_stem(w) for text in reference_texts for w in normalize_query(text).split()}
    return sum(_stem(w) in reference for w in words) / len(words)


QueryWriter = Callable[[list[str]], str]


def build_wscr_queries(catalog: Catalog, facets: Facets, seed: int, max_pairs: int | None = None,
                       query_writer: QueryWriter | None = None,
                       fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> pl.DataFrame:
    """One (query, reference set) pair per collection; `query_writer` (e.g. an LLM) names untitled sets.
    Pairs whose query may be evaluated on (EVALUATION_SOURCES) are split by query text in `fractions`; the
    rest (keyword summaries) are training data only."""
    cols = catalog.collections
    if max_pairs is not None and cols.height > max_pairs:
        cols = cols[np.sort(np.random.default_rng(seed).permutation(cols.height)[:max_pairs]).tolist()]
    text_of = catalog.item_texts()
    catalog_df = document_frequency(list(text_of.values()))
    genres = set(facets.genres)
    rows = []
    for cid, title, tags, ids in cols.select("collection_id", "title", "tags", "item_ids").iter_rows():
        query, source = clean_title(title, facets.stopwords), "title"
        if genres and query:
            query = normalize_query(" ".join([*[t.lower() for t in tags if t.lower() in genres][:2], query]))
        texts = [text_of[i] for i in ids]
        if not query:
            query, source = (query_writer(texts), "llm") if query_writer else ("", "")
            if not query:  # no model configured, or it wrote nothing usable
                query, source = keyword_summary(texts, facets, catalog_df), "keywords"
        query = normalize_query(query)
        if query:
            rows.append({"collection_id": cid, "query": query, "source": source, "reference_ids": list(ids),
                         "leakage": leakage(query, texts, facets)})
    schema = {"collection_id": pl.String, "query": pl.String, "source": pl.String,
              "reference_ids": pl.List(pl.String), "leakage": pl.Float64}
    pairs = pl.DataFrame(rows, schema=schema)
    evaluable = pairs.filter(pl.col("source").is_in(EVALUATION_SOURCES))["query"].unique(maintain_order=True)
    group_split = dict(zip(evaluable.to_list(), split_labels(len(evaluable), seed, fractions).tolist()))
    split = [group_split.get(q, "train") for q in pairs["query"].to_list()]
    return pairs.with_columns(split=pl.Series(split, dtype=pl.String)).with_row_index("n").select(
        pl.format(f"{catalog.name}-wscr-{{}}", pl.col("n").cast(pl.String).str.zfill(6)).alias("query_id"),
        *schema, "split")


def written_first(pairs: pl.DataFrame) -> pl.DataFrame:
    """WSCR pairs whose query a person or an LLM wrote (EVALUATION_SOURCES, the kind validation and test hold) when
    there are any, else all of them. What a FOLM learns from (warm start, RL, synthetic targets) should look like
    what it is tested on: a keyword summary's words come from its reference items, so its coverage rewards echoing
    the query's words, which set titles do not. Demo Polyvore, 40 GRPO steps, three seeds: tuned on all 3,724
    training pairs (74% keyword summaries) the FOLM's reward on validation titles fell from the zero-shot's 0.298 to
    0.23-0.26, tuned on the 953 titles to 0.27-0.31; test recall@3.5% over the zero-shot's +0.2 against +0.6 on
    average (200 steps: +0.4 against +1.2), each within about two paired standard errors."""
    written = pairs.filter(pl.col("source").is_in(EVALUATION_SOURCES))
    return written if written.height else pairs


def learning_rule(regime: str) -> tuple[str, tuple[str, ...]] | str:
    """Which training queries `learning_queries` keeps for `regime`, as a value: the assets that read them put it in
    their code_version, so changing the rule re-runs them."""
    return (written_first.__name__, EVALUATION_SOURCES) if regime == "wscr" else "all"


def learning_queries(path: Path, regime: str) -> pl.DataFrame:
    """The training split that RL and synthesis learn from: every OAR query; WSCR's `written_first` pairs."""
    train = load_corpus(path, regime, "train")
    return train if learning_rule(regime) == "all" else written_first(train)


def split_counts(frame: pl.DataFrame) -> dict[str, int]:
    counts = dict(frame["split"].value_counts().iter_rows())
    return {s: int(counts.get(s, 0)) for s in SPLITS}


def source_counts(frame: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Queries per split and source family ('template:aesthetic' counts as 'template')."""
    family = frame["source"].str.split(":").list.first()
    counts = frame.with_columns(family=family).group_by("split", "family").len()
    return {s: {f: int(n) for _, f, n in counts.filter(pl.col("split") == s).sort("family").iter_rows()}
            for s in SPLITS}


def leakage_summary(pairs: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Mean leakage per split and source: how much of the query text the reference items already contain."""
    means = pairs.group_by("split", "source").agg(pl.col("leakage").mean()).sort("split", "source")
    return {s: {source: round(float(v), 3) for _, source, v in means.filter(pl.col("split") == s).iter_rows()}
            for s in SPLITS}


def save_corpus(path: Path, oar: pl.DataFrame, wscr: pl.DataFrame) -> None:
    with atomic_dir(path) as tmp:
        oar.write_parquet(tmp / "oar.parquet")
        wscr.write_parquet(tmp / "wscr.parquet")


def load_corpus(path: Path, regime: str, split: str | None = None) -> pl.DataFrame:
    file = Path(path) / f"{regime}.parquet"
    if not file.exists():
        raise FileNotFoundError(f"no {regime} queries at {file}; materialise the broad_queries asset first")
    frame = pl.scan_parquet(file)
    return (frame if split is None else frame.filter(pl.col("split") == split)).collect()
