"""`r4t`: retrieve with any method, benchmark fan-out latency, fetch the source data.

Every command reads the artefacts of the latest materialisation (the records the Dagster IO manager keeps
under `<work_dir>/<profile>/records/`) and refuses artefacts built from different versions of the same
upstream asset. Errors are one line on stderr with a non-zero exit code; `--debug` shows the traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from r4t_pipeline.methods import ALIASES, METHODS
from r4t_pipeline.modit.config import METHOD_LABELS as MODIT_METHODS
from r4t_pipeline.settings import PROFILES, Settings, load_settings


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_int_list(text: str) -> list[int]:
    return [positive_int(part.strip()) for part in text.split(",")]


def _catalog(settings: Settings, name: str) -> str:
    if name not in settings.catalogs:
        raise UsageError(f"unknown catalog {name!r}; declared: {', '.join(settings.catalogs)} "
                         "(the catalogs: section of $R4T_CONFIG)")
    return name


def _retrieve(args: argparse.Namespace) -> int:
    from r4t_pipeline import stack
    from r4t_pipeline.catalog import Catalog

    if not args.query.strip():
        raise UsageError("the query is empty; give a broad intent, e.g. \"bohemian festival style\"")
    settings = load_settings(args.profile)
    catalog = _catalog(settings, args.domain)
    method = ALIASES.get(args.method, args.method)
    records, artefacts = stack.latest_artefacts(settings, catalog, args.regime, [method])
    retriever = stack.build_retriever(settings, args.regime, method, artefacts)
    pool = settings.rewards.k * (1 if args.regime == "oar" else args.per_direction)
    fanout = retriever.retrieve([args.query], pool, seed=args.seed).fanouts[0]
    cat = Catalog.load(records["catalog"].path)
    if args.regime == "oar":
        label = {cid: title or cid for cid, title in cat.collections.select("collection_id", "title").iter_rows()}
    else:
        label = cat.item_texts()
    directions = [{"direction": n, "subquery": fanout.subqueries[n] if fanout.subqueries else None,
                   "items": [{"id": i, "text": label[i], "score": round(float(s), 4)}
                             for i, s in zip(ids[:args.show], scores[:args.show])]}
                  for n, (ids, scores) in enumerate(zip(fanout.candidate_ids, fanout.candidate_scores))]
    if args.json:
        print(json.dumps({"query": args.query, "method": method, "catalog": catalog, "regime": args.regime,
                          "directions": directions, "merged": fanout.merged}, indent=2))
        return 0
    print(f"{args.query!r} -> {len(directions)} directions ({method}, {catalog}/{args.regime})")
    for d in directions:
        print(f"\n[{d['direction'] + 1}] {d['subquery'] or '(generated direction)'}")
        for item in d["items"]:
            print(f"    {item['score']:.3f}  {item['text']}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from r4t_pipeline.bench import format_table, run_benchmark
    from r4t_pipeline.io import write_json
    from r4t_pipeline.stack import latest_artefacts

    settings = load_settings(args.profile)
    catalog = _catalog(settings, args.domain)
    methods = [ALIASES.get(m, m) for m in args.methods.split(",")] if args.methods else None
    unknown = [m for m in methods or [] if m not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.serve:
        return _bench_serve(args, settings, catalog, methods or settings.serve.methods)
    methods = methods or list(METHODS)
    records, artefacts = latest_artefacts(settings, catalog, args.regime, methods)
    report = run_benchmark(settings, catalog, args.regime, records["broad_queries"].path, artefacts,
                           args.batch_sizes, args.repeats, args.budget_seconds, methods)
    write_json(args.out, report)
    print(format_table(report["results"], args.batch_sizes))
    print(f"\nwritten to {args.out}")
    return 0


def _bench_serve(args: argparse.Namespace, settings: Settings, catalog: str, methods: list[str]) -> int:
    from r4t_pipeline.bench import benchmark_queries
    from r4t_pipeline.io import write_json
    from r4t_pipeline.loadgen import format_serve_table, serve_benchmark
    from r4t_pipeline.records import RecordStore

    not_served = [m for m in methods if m not in settings.serve.methods]
    if not_served:
        raise UsageError(f"--methods: {not_served} are not served (serve.methods: {settings.serve.methods})")
    queries = benchmark_queries(RecordStore(settings.records_dir).read(f"{catalog}/broad_queries").path, args.regime)
    report = serve_benchmark(settings, catalog, args.regime, queries, methods, args.concurrency, args.requests)
    write_json(args.out, report)
    print(format_serve_table(report))
    print(f"\nwritten to {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from r4t_pipeline.serve import serve

    settings = load_settings(args.profile)
    for name in args.catalog or []:
        _catalog(settings, name)
    serve(settings, args.host or settings.serve.host, args.port or settings.serve.port, args.catalog)
    return 0


def _expand(args: argparse.Namespace) -> int:
    from r4t_pipeline.modit.artefacts import latest_expansion
    from r4t_pipeline.modit.expand import expand, format_expansion
    from r4t_pipeline.records import RecordStore

    settings = load_settings(args.profile)
    catalog, cfg = _catalog(settings, args.domain), settings.modit
    found = latest_expansion(RecordStore(settings.records_dir), cfg, catalog, args.task, args.protocol)
    data, items, embeddings = found.load()
    result = expand(args.seeds.split(","), data, items, embeddings, cfg, k=args.k, method=args.method,
                    protocol=args.protocol, checkpoints=found.checkpoints(),
                    interpolation_lambda=found.interpolation_lambda())
    for warning in result.warnings:
        print(f"r4t expand: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps({"catalog": catalog, "protocol": args.protocol, **result.__dict__}, indent=2))
    else:
        print(format_expansion(result, data.task.column))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from r4t_pipeline.catalogs import BUILTINS
    from r4t_pipeline.sources import resolve_data_dir
    from r4t_pipeline.sources.files import ensure_files

    data_dir = resolve_data_dir(args.data_dir)
    for builtin in args.domains:
        paths = ensure_files(data_dir, BUILTINS[builtin][1], allow_download=True)
        print("\n".join(str(p) for p in paths.values()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r4t", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=None, help=f"{' | '.join(PROFILES)} (default: $R4T_PROFILE or demo)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    retrieve = sub.add_parser("retrieve", help="retrieve a set of items for a broad query")
    retrieve.add_argument("query")
    retrieve.add_argument("--domain", "--catalog", dest="domain", default="polyvore",
                          help="a declared catalog (default polyvore)")
    retrieve.add_argument("--regime", choices=["oar", "wscr"], default="wscr",
                          help="wscr: retrieve items; oar: retrieve collections")
    retrieve.add_argument("--method", default="diffusion", choices=[*ALIASES, *METHODS])
    retrieve.add_argument("--per-direction", type=positive_int, default=5,
                          help="items shown and retrieved per direction")
    retrieve.add_argument("--show", type=positive_int, default=5)
    retrieve.add_argument("--seed", type=int, default=0)
    retrieve.add_argument("--json", action="store_true", help="machine-readable output")
    retrieve.set_defaults(run=_retrieve)

    bench = sub.add_parser("bench", help="fan-out latency per batch size for every method (writes JSON)")
    bench.add_argument("--domain", "--catalog", dest="domain", default="polyvore")
    bench.add_argument("--regime", choices=["oar", "wscr"], default="oar")
    bench.add_argument("--batch-sizes", type=positive_int_list, default=[8, 64, 256, 1024],
                       help="comma-separated positive integers (default 8,64,256,1024)")
    bench.add_argument("--repeats", type=positive_int, default=3)
    bench.add_argument("--budget-seconds", type=float, default=120.0,
                       help="skip a batch size whose time, projected linearly from the size before it, "
                            "exceeds this")
    bench.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    bench.add_argument("--out", type=Path, default=Path("bench.json"))
    bench.add_argument("--serve", action="store_true",
                       help="start `r4t serve` on loopback and measure throughput and p50/p95/p99 latency under load")
    bench.add_argument("--concurrency", type=positive_int_list, default=[1, 8, 32],
                       help="with --serve: concurrent clients (default 1,8,32)")
    bench.add_argument("--requests", type=positive_int, default=200,
                       help="with --serve: requests per method and concurrency level (text methods: an eighth)")
    bench.set_defaults(run=_bench)

    serve = sub.add_parser("serve", help="the retrievers as an HTTP service (FastAPI on uvicorn)")
    serve.add_argument("--host", default=None,
                       help="interface to bind (default 127.0.0.1, loopback only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=positive_int, default=None, help="default 8080 (serve.port)")
    serve.add_argument("--catalog", action="append", default=None, help="serve only this catalog (repeatable)")
    serve.set_defaults(run=_serve)

    expand = sub.add_parser("expand", help="MO-DiT+HPPO: more items in the seeds' pattern with a target attribute")
    expand.add_argument("--domain", "--catalog", dest="domain", default="polyvore")
    expand.add_argument("--task", required=True, help="an attribute task: its name, or its column on the catalog")
    expand.add_argument("--seeds", required=True, help="comma-separated item ids that share a pattern")
    expand.add_argument("-k", type=positive_int, default=20, help="items to return (default 20)")
    expand.add_argument("--method", default="hppo", choices=list(MODIT_METHODS))
    expand.add_argument("--protocol", choices=["item", "pattern"], default="item",
                        help="which holdout's model to use (default item)")
    expand.add_argument("--json", action="store_true", help="machine-readable output")
    expand.set_defaults(run=_expand)

    fetch = sub.add_parser("fetch-data", help="download the built-in catalogs' source files into the data directory")
    fetch.add_argument("--data-dir", default=None)
    fetch.add_argument("--domains", nargs="+", default=["polyvore", "djmix"], choices=["polyvore", "djmix"])
    fetch.set_defaults(run=_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"r4t {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
