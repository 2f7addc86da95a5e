"""Stage 2 (SPEC §4): the RL-tuned FOLM writes objective-aligned training targets for the diffusion model.

For each training query: sample S fan-outs, execute them, score them with the training reward, keep the
successful ones (the top fraction per query, optionally above a reward threshold) and store the K x d
target tensor Y: OAR, E_c of each sub-query's top-1 database entry (grounded targets); WSCR, the
sub-query embeddings e_k. Fan-outs with fewer than K sub-queries are completed by cycling their rows
(Y is a set, so this repeats directions rather than inventing them) when at least
`min_subqueries_fraction` x K are present; shorter ones cannot stand for K directions and are dropped.

Parquet schema, one row per kept (query, sample), written in chunks `part-NNNNN.parquet` so that a crash
loses at most one chunk and a rerun resumes:
  query_id str, query str, sample_index int32, subqueries list<str>,
  query_embedding fixed_size_list<float32>[d], targets fixed_size_list<fixed_size_list<float32>[d]>[K],
  reward_total and reward_<term> float64 (each term of the regime's reward), folm_checkpoint str
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from r4t_pipeline.config import SynthConfig
from r4t_pipeline.fanout import parse_fanout
from r4t_pipeline.io import atomic_file, stable_hash
from r4t_pipeline.rewards import FanoutScorer, query_specificity
from r4t_pipeline.tracking import LogFn


def cycle_rows(vectors: np.ndarray, k: int) -> np.ndarray:
    """K rows from n < K: the n rows repeated in turn (a set: this repeats directions, it invents none)."""
    return vectors[np.arange(k) % len(vectors)]


def _chunk_table(rows: list[dict], k: int, dim: int) -> pa.Table:
    flat_targets = pa.array(np.concatenate([r.pop("targets").ravel() for r in rows]), pa.float32())
    targets = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat_targets, dim), k)
    query = pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([r.pop("query_embedding") for r in rows]), pa.float32()), dim)
    table = pa.Table.from_pylist(rows)
    return table.append_column("query_embedding", query).append_column("targets", targets)


def synthesize_targets(model, tokenizer, scorer: FanoutScorer, queries: pl.DataFrame, config: SynthConfig,
                       out_dir: Path, folm_checkpoint: str, log_fn: LogFn | None = None) -> dict:
    """Write the target Parquet dataset to `out_dir` (atomically, resuming a previous partial run)."""
    from r4t_pipeline.folm.generate import generate_fanouts

    k, regime = scorer.config.k, scorer.config.regime
    queries = queries.head(config.max_queries) if config.max_queries else queries
    stage = out_dir.with_name(out_dir.name + ".partial")
    fingerprint = stable_hash([config.model_dump(), folm_checkpoint, scorer.config.model_dump(),
                               queries["query_id"].to_list()])
    progress_file = stage / "progress.json"
    resumable = progress_file.exists() and json.loads(progress_file.read_text())["fingerprint"] == fingerprint
    if stage.exists() and not resumable:
        shutil.rmtree(stage)  # a partial run of different inputs cannot be resumed
    stage.mkdir(parents=True, exist_ok=True)
    progress_file.write_text(json.dumps({"fingerprint": fingerprint}))

    chunks = [queries.slice(i, config.chunk_queries) for i in range(0, queries.height, config.chunk_queries)]
    started, sampled, kept = time.perf_counter(), 0, 0
    for n, chunk in enumerate(tqdm(chunks, desc="synthesise targets", disable=None)):
        part = stage / f"part-{n:05d}.parquet"
        if part.exists():
            continue  # done by an earlier, interrupted run
        texts = chunk["query"].to_list()
        completions = generate_fanouts(model, tokenizer, texts, k, config.samples_per_query, config.temperature,
                                       config.max_new_tokens, config.batch_size, config.seed + n,
                                       config.no_repeat_ngram_size, k if config.fill_k_lines else 0)
        rows = _score_chunk(scorer, chunk, completions, config, folm_checkpoint, k, regime)
        sampled += len(texts) * config.samples_per_query
        kept += len(rows)
        if rows:
            with atomic_file(part) as tmp:
                pq.write_table(_chunk_table(rows, k, scorer.space.dim), tmp)
        else:
            part.touch()
        if log_fn:
            seconds = time.perf_counter() - started
            log_fn(n, {"fanouts_per_second": sampled / seconds, "kept_rows": kept})

    seconds = time.perf_counter() - started
    if not any(p.stat().st_size for p in stage.glob("part-*.parquet")):
        raise ValueError(f"no fan-out of the FOLM ({folm_checkpoint}) had at least "
                         f"{config.min_subqueries_fraction:g} x K = {config.min_subqueries_fraction * k:g} "
                         "sub-queries; "
                         "train the FOLM longer or lower synth.min_subqueries_fraction")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for empty in (p for p in stage.glob("part-*.parquet") if p.stat().st_size == 0):
        empty.unlink()
    progress_file.unlink()
    os.replace(stage, out_dir)
    return summarize_targets(out_dir) | {"seconds": seconds, "fanouts_sampled_this_run": sampled,
                                         "fanouts_per_second": sampled / max(seconds, 1e-9)}


def _score_chunk(scorer: FanoutScorer, chunk: pl.DataFrame, completions: list[list[str]], config: SynthConfig,
                 folm_checkpoint: str, k: int, regime: str) -> list[dict]:
    references = chunk["reference_ids"].to_list() if regime == "wscr" else [None] * chunk.height
    flat_q, flat_sub, flat_ref, owner, sample = [], [], [], [], []
    for i, (query, group, ref) in enumerate(zip(chunk["query"].to_list(), completions, references)):
        for s, text in enumerate(group):
            subqueries = list(parse_fanout(text, k).subqueries)
            if subqueries and len(subqueries) >= config.min_subqueries_fraction * k:
                flat_q.append(query)
                flat_sub.append(scorer.subqueries(query, subqueries))  # the texts the reward embeds
                flat_ref.append(ref)
                owner.append(i)
                sample.append(s)
    if not flat_sub:
        return []
    terms = scorer.score_subqueries(flat_q, flat_sub, flat_ref if regime == "wscr" else None)
    totals = np.array([t["total"] for t in terms])
    keep = []
    for i in range(chunk.height):
        mine = [j for j in range(len(owner)) if owner[j] == i]
        if config.keep == "top_fraction":
            n_keep = max(1, int(round(config.keep_fraction * config.samples_per_query)))
            mine = sorted(mine, key=lambda j: -totals[j])[:n_keep]
        if config.reward_threshold is not None:
            mine = [j for j in mine if totals[j] >= config.reward_threshold]
        keep += mine
    query_ids, query_vectors = chunk["query_id"].to_list(), scorer.embed_texts(chunk["query"].to_list())
    rows = []
    for j in keep:
        sub_vectors = scorer.embed_texts(flat_sub[j][:k])
        if regime == "oar":
            _, top1 = scorer.index.search(sub_vectors, 1)
            sub_vectors = scorer.index.vectors[top1[:, 0]]
        term_columns = {f"reward_{name}": float(v) for name, v in terms[j].items()
                        if name not in ("total", "query_specificity")}  # the targets' own is in the summary
        rows.append({"query_id": query_ids[owner[j]], "query": flat_q[j], "sample_index": sample[j],
                     "subqueries": flat_sub[j][:k], "reward_total": float(totals[j]), **term_columns,
                     "folm_checkpoint": folm_checkpoint, "query_embedding": query_vectors[owner[j]],
                     "targets": cycle_rows(sub_vectors, k)})
    return rows


def load_targets(path: Path) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """(targets (N, K, d), query embeddings (N, d), the other columns)."""
    files = sorted(Path(path).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no synthetic targets at {path}; materialise the synthetic_targets asset first")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    targets_col = table.column("targets").combine_chunks()
    k = targets_col.type.list_size
    dim = targets_col.type.value_type.list_size
    targets = targets_col.flatten().flatten().to_numpy().reshape(len(table), k, dim)
    queries = table.column("query_embedding").combine_chunks().flatten().to_numpy().reshape(len(table), dim)
    frame = pl.from_arrow(table.drop_columns(["targets", "query_embedding"]))
    return targets.astype(np.float32), queries.astype(np.float32), frame


def summarize_targets(path: Path) -> dict:
    targets, queries, frame = load_targets(path)
    totals = frame["reward_total"]
    specificity = query_specificity(targets, queries, frame["query_id"].to_list())
    return {"rows": frame.height, "queries": int(frame["query_id"].n_unique()), "k": targets.shape[1],
            "dim": targets.shape[2], "sigma_data": float(targets.std()),
            # ~0: the teacher's targets do not depend on their query, and the diffusion has no query to compile
            "query_specificity": float(specificity.mean()) if len(specificity) else float("nan"),  # NaN: 1 query
            "reward_mean": float(totals.mean()), "reward_p10": float(totals.quantile(0.1)),
            "reward_p90": float(totals.quantile(0.9))}
