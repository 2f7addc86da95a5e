"""`r4t`: retrieve with any method, expand a seed set (MO-DiT+HPPO), benchmark fan-out latency, fetch the
source data."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r4t_pipeline.settings import load_settings


def _retrieve(args: argparse.Namespace) -> int:
    from r4t_pipeline import stack
    from r4t_pipeline.catalog import Catalog

    if not args.query.strip():
        raise SystemExit("r4t retrieve: the query is empty; give a broad intent, e.g. \"bohemian festival style\"")
    settings = load_settings(args.profile)
    method = {"diffusion": "r4t_diffusion", "folm": "r4t_folm"}.get(args.method, args.method)
    try:
        retriever = stack.build_retriever(settings, args.domain, args.regime, method)
    except FileNotFoundError as err:
        raise SystemExit(f"r4t retrieve: {err} (e.g. `dagster asset materialize -m r4t_pipeline.definitions "
                         f"--select '*'`)") from None
    pool = settings.rewards.k * (1 if args.regime == "oar" else args.per_direction)
    fanout = retriever.retrieve([args.query], pool, seed=args.seed).fanouts[0]
    catalog = Catalog.load(settings.artefact(args.domain, "catalog"))
    label = (dict(zip(catalog.collections["collection_id"], catalog.collections["title"].where(
        catalog.collections["title"] != "", catalog.collections["collection_id"]))) if args.regime == "oar"
        else dict(zip(catalog.items["item_id"], catalog.items["text"])))
    directions = [{"direction": n, "subquery": fanout.subqueries[n] if fanout.subqueries else None,
                   "items": [{"id": i, "text": label[i], "score": round(float(s), 4)}
                             for i, s in zip(ids[:args.show], scores[:args.show])]}
                  for n, (ids, scores) in enumerate(zip(fanout.candidate_ids, fanout.candidate_scores))]
    if args.json:
        print(json.dumps({"query": args.query, "method": method, "domain": args.domain, "regime": args.regime,
                          "directions": directions, "merged": fanout.merged}, indent=2))
        return 0
    print(f"{args.query!r} -> {len(directions)} directions ({method}, {args.domain}/{args.regime})")
    for d in directions:
        print(f"\n[{d['direction'] + 1}] {d['subquery'] or '(generated direction)'}")
        for item in d["items"]:
            print(f"    {item['score']:.3f}  {item['text']}")
    return 0


def _expand(args: argparse.Namespace) -> int:
    from r4t_pipeline.catalog import Catalog
    from r4t_pipeline.embeddings import CatalogEmbeddings
    from r4t_pipeline.modit.expand import expand_from_layout, format_expansion
    from r4t_pipeline.modit.pipeline import ModitLayout

    settings = load_settings(args.profile)
    layout = ModitLayout(Path(args.modit_dir) if args.modit_dir else settings.artefact("modit"))
    try:
        catalog = Catalog.load(settings.artefact(args.domain, "catalog"))
        embeddings = CatalogEmbeddings.load(settings.artefact(args.domain, "embeddings"))
        result = expand_from_layout(layout, catalog, embeddings, args.domain, args.task, args.seeds.split(","),
                                    k=args.k, method=args.method, protocol=args.protocol)
    except FileNotFoundError as err:
        raise SystemExit(f"r4t expand: {err}") from None
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
        return 0
    for warning in result.warnings:
        print(f"r4t expand: warning: {warning}", file=sys.stderr)
    print(format_expansion(result, layout.load_config().task(result.task).column))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from r4t_pipeline.bench import format_table, run_benchmark
    from r4t_pipeline.io import write_json

    settings = load_settings(args.profile)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    report = run_benchmark(settings, args.domain, args.regime, sizes, args.repeats, args.budget_seconds,
                           args.methods.split(",") if args.methods else None)
    write_json(args.out, report)
    print(format_table(report["results"], sizes))
    print(f"\nwritten to {args.out}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from r4t_pipeline.sources import resolve_data_dir
    from r4t_pipeline.sources.files import ensure_files
    from r4t_pipeline.stack import source_files

    data_dir = resolve_data_dir(args.data_dir)
    for domain in args.domains:
        paths = ensure_files(data_dir, source_files(domain), allow_download=True)
        print("\n".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r4t", description=__doc__)
    parser.add_argument("--profile", default=None, help="smoke | demo | paper (default: $R4T_PROFILE or demo)")
    sub = parser.add_subparsers(dest="command", required=True)

    retrieve = sub.add_parser("retrieve", help="retrieve a set of items for a broad query")
    retrieve.add_argument("query")
    retrieve.add_argument("--domain", choices=["polyvore", "djmix"], default="polyvore")
    retrieve.add_argument("--regime", choices=["oar", "wscr"], default="wscr",
                          help="wscr: retrieve items; oar: retrieve collections")
    retrieve.add_argument("--method", default="diffusion",
                          choices=["diffusion", "folm", "no_fanout", "zero_shot", "best_of_n", "r4t_folm",
                                   "r4t_diffusion"])
    retrieve.add_argument("--per-direction", type=int, default=5, help="items shown and retrieved per direction")
    retrieve.add_argument("--show", type=int, default=5)
    retrieve.add_argument("--seed", type=int, default=0)
    retrieve.add_argument("--json", action="store_true", help="machine-readable output")
    retrieve.set_defaults(run=_retrieve)

    expand = sub.add_parser("expand", help="more items in the seeds' pattern with a target attribute (MO-DiT+HPPO)")
    expand.add_argument("--domain", choices=["polyvore", "djmix"], default="polyvore")
    expand.add_argument("--task", required=True, help="attribute task: its name (polyvore_likes) or column (likes)")
    expand.add_argument("--seeds", required=True, help="comma-separated item ids")
    expand.add_argument("-k", type=int, default=20)
    expand.add_argument("--method", default="hppo",
                        choices=["hppo", "modit", "ordered", "pretrained", "interpolation", "global_attribute",
                                 "seed_centroid"])
    expand.add_argument("--protocol", choices=["item", "pattern"], default="item",
                        help="which protocol's models to use")
    expand.add_argument("--modit-dir", default=None, help="the MO-DiT run folder (default: <work_dir>/<profile>/modit)")
    expand.add_argument("--json", action="store_true", help="machine-readable output")
    expand.set_defaults(run=_expand)

    bench = sub.add_parser("bench", help="fan-out latency per batch size for every method (writes JSON)")
    bench.add_argument("--domain", choices=["polyvore", "djmix"], default="polyvore")
    bench.add_argument("--regime", choices=["oar", "wscr"], default="oar")
    bench.add_argument("--batch-sizes", default="8,64,256,1024")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--budget-seconds", type=float, default=120.0,
                       help="skip larger batches of a method once one run exceeds this")
    bench.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    bench.add_argument("--out", type=Path, default=Path("bench.json"))
    bench.set_defaults(run=_bench)

    fetch = sub.add_parser("fetch-data", help="download the source data files into the data directory")
    fetch.add_argument("--data-dir", default=None)
    fetch.add_argument("--domains", nargs="+", default=["polyvore", "djmix"], choices=["polyvore", "djmix"])
    fetch.set_defaults(run=_fetch)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as err:
        print(f"r4t {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
