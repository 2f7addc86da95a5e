"""Evaluation assets: the methods side by side per catalog and regime, the fan-out latency benchmark of every
catalog, and the report that a user reads to decide whether R4T is worth deploying."""

import json
import shutil
from pathlib import Path

import dagster as dg

from r4t_pipeline.bench import benchmark_queries, format_table, run_benchmark
from r4t_pipeline.defs.modit import EVALUATION_KEY
from r4t_pipeline.defs.production import Production, code_version, retry_transient, write_result
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.evaluation import METRICS_FILE, RESULT_VERSION, FinishedRows, run_evaluation
from r4t_pipeline.loadgen import format_serve_table, serve_benchmark
from r4t_pipeline.modit.artefacts import EVALUATION_DIR
from r4t_pipeline.modit.artefacts import LATENCY_FILE as MODIT_LATENCY_FILE
from r4t_pipeline.records import FileRecord, Record
from r4t_pipeline.report import (
    headroom_table,
    latency_figure,
    metrics_table,
    paired_table,
    render_html,
    render_markdown,
    reward_figure,
    reward_table,
)
from r4t_pipeline.settings import Settings
from r4t_pipeline.stack import artefacts_of, reward_version

LATENCY_FILE = "latency.json"


def _stage_ins(name: str, regime: str, prefix: str = "") -> dict[str, dg.AssetIn]:
    """The records a retriever of this catalog and regime reads, keyed (after `prefix`) by asset name."""
    per_catalog = ("folm_base", "supervised_diffusion", "broad_queries", "embedding_index")
    return {**{f"{prefix}{a}": dg.AssetIn(key=[name, a]) for a in per_catalog},
            **{f"{prefix}{a}": dg.AssetIn(key=[name, regime, a]) for a in ("folm_checkpoint", "diffusion_checkpoint")}}


def evaluation_asset(settings: Settings, name: str, regime: str):
    prefix = [name, regime]

    @dg.asset(key=[*prefix, "evaluation"], group_name="evaluation", kinds={"json"},
              ins={**_stage_ins(name, regime), "catalog": dg.AssetIn(key=[name, "catalog"])},
              # the validation reward is the regime's; Best-of-N selects by the reference-free OAR reward
              code_version=code_version(settings.evaluation.version(), settings.diffusion.sampling(),
                                        settings.folm.decoding(regime), settings.query_runtime, RESULT_VERSION[regime],
                                        reward_version(settings, regime), reward_version(settings, "oar")),
              description=f"Every fan-out method (no fan-out, zero-shot, Best-of-N, R4T-FOLM, R4T-Diffusion and the "
                          f"supervised anchor) on the {name} {regime.upper()} test split.")
    @retry_transient
    def evaluation(context: dg.AssetExecutionContext, mlflow: MlflowTracking, **inputs: Record
                   ) -> dg.Output[FileRecord]:
        production = Production(context, settings, inputs)
        if reused := production.reuse():
            return reused
        artefacts = artefacts_of(regime, inputs)
        finished_rows = production.path.with_name(f"{production.version}.resume")  # what a rerun goes on from
        if done := FinishedRows(finished_rows).names():
            context.log.info(f"{name}/{regime} evaluation: going on from an interrupted run, {len(done)} rows "
                             f"read back ({', '.join(done)})")
        with mlflow.run(f"{name}/{regime}/evaluation", params=settings.evaluation.model_dump()) as run:
            def log_row(row: str, step: int, means: dict[str, float]) -> None:  # as each is done: MLflow, run log
                run.log(step, {f"{row}/{metric}": value for metric, value in means.items()})
                context.log.info(f"{name}/{regime} evaluation: {row} done ({step} rows so far)")

            result = run_evaluation(settings, regime, inputs["catalog"].path, inputs["broad_queries"].path, artefacts,
                                    log_fn=log_row, resume_dir=finished_rows)
            rows = ({f"headroom_{bound}": v for bound, v in result.get("headroom", {}).items()}
                    | {f"{p['method']}-{p['against']}": p["difference"] for p in result.get("paired", [])})
            run.log(0, {f"{row}/{metric}": value[0] for row, values in rows.items()
                        for metric, value in values.items()})
        write_result(production, METRICS_FILE, result)
        shutil.rmtree(finished_rows, ignore_errors=True)
        metadata = {"queries": result["queries"], "query_sources": result["query_sources"]}
        if result.get("skipped"):
            metadata["skipped"] = result["skipped"]
        else:
            metadata |= {"table": dg.MetadataValue.md(metrics_table(result)),
                         "validation_reward": dg.MetadataValue.md(reward_table(result))}
            if paired := paired_table(result):
                metadata["paired_differences"] = dg.MetadataValue.md(paired)
            if headroom := headroom_table(result):
                metadata["headroom"] = dg.MetadataValue.md(headroom)
        return production.output(production.record(FileRecord), metadata)

    return evaluation


def report_assets(settings: Settings, names: list[str]) -> list:
    cfg, regime = settings.evaluation, settings.regimes[0]
    modit_in = {"modit": dg.AssetIn(key=EVALUATION_KEY)} if settings.modit.tasks else {}
    evaluations = [[n, r, "evaluation"] for n in names for r in settings.regimes]
    folms = [[n, r, "folm_checkpoint"] for n in names for r in settings.regimes]

    @dg.asset(key=["latency_benchmark"], group_name="evaluation", kinds={"json"},
              ins={k: v for n in names for k, v in _stage_ins(n, regime, prefix=f"{n}__").items()},
              code_version=code_version(cfg.latency_batch_sizes, cfg.latency_repeats, cfg.latency_budget_seconds,
                                        settings.diffusion.sampling(), settings.folm.decoding(regime),
                                        cfg.serve_concurrency, cfg.serve_requests,
                                        settings.serve.model_dump(mode="json"), settings.query_runtime),
              description=f"Fan-out latency per batch size of every method on this machine, per catalog "
                          f"({regime.upper()}; median over repeats), and `r4t serve` under concurrent HTTP load.")
    @retry_transient
    def latency_benchmark(context: dg.AssetExecutionContext, **inputs: Record) -> dg.Output[FileRecord]:
        production = Production(context, settings, inputs)
        if reused := production.reuse():
            return reused
        reports = []
        for n in names:
            mine = {k.removeprefix(f"{n}__"): v for k, v in inputs.items() if k.startswith(f"{n}__")}
            artefacts = artefacts_of(regime, mine)
            report = run_benchmark(settings, n, regime, mine["broad_queries"].path, artefacts,
                                   cfg.latency_batch_sizes, cfg.latency_repeats, cfg.latency_budget_seconds)
            if cfg.serve_concurrency:  # the same models behind HTTP, from the records just materialised
                context.log.info(f"r4t serve under load: {n} {regime}, {cfg.serve_concurrency} clients")
                report["serve"] = serve_benchmark(settings, n, regime,
                                                  benchmark_queries(mine["broad_queries"].path, regime),
                                                  settings.serve.methods, cfg.serve_concurrency, cfg.serve_requests)
            reports.append(report)
        write_result(production, LATENCY_FILE, {"benchmarks": reports})
        return production.output(production.record(FileRecord), {
            **{f"{r['catalog']}_table": dg.MetadataValue.md(format_table(r["results"], cfg.latency_batch_sizes))
               for r in reports},
            **{f"{r['catalog']}_serve": dg.MetadataValue.md(format_serve_table(r["serve"])) for r in reports
               if "serve" in r}, "device": reports[0]["machine"]["device"]})

    @dg.asset(key=["evaluation_report"], group_name="evaluation", kinds={"html"},
              ins={"latency": dg.AssetIn(key=latency_benchmark.key),
                   **{"__".join(key[:2]): dg.AssetIn(key=key) for key in evaluations},
                   **{"__".join(key[:2]) + "__folm": dg.AssetIn(key=key) for key in folms}, **modit_in},
              code_version=code_version("report"),
              description="Markdown + self-contained HTML: tables per catalog and regime, latency figure, RL reward "
                          "curves and qualitative examples.")
    @retry_transient
    def evaluation_report(context: dg.AssetExecutionContext, mlflow: MlflowTracking, latency: FileRecord,
                          **inputs: Record) -> dg.Output[FileRecord]:
        production = Production(context, settings, {"latency": latency, **inputs})
        if reused := production.reuse():
            return reused
        modit = inputs.pop("modit", None)
        results = [json.loads((Path(r.path) / METRICS_FILE).read_text())
                   for k, r in inputs.items() if not k.endswith("__folm")]
        benchmarks = json.loads((Path(latency.path) / LATENCY_FILE).read_text())["benchmarks"]
        curves = {k.removesuffix("__folm").replace("__", "/"): _folm_history(r.model)
                  for k, r in inputs.items() if k.endswith("__folm")}
        modit_result = modit_latency = None
        if modit:
            modit_result = json.loads((Path(modit.path) / EVALUATION_DIR / "evaluation.json").read_text())
            modit_latency = json.loads((Path(modit.path) / MODIT_LATENCY_FILE).read_text())
        markdown = render_markdown(results, benchmarks, modit_result, modit_latency)
        figures = {f"Fan-out latency vs batch size ({b['catalog']})": latency_figure(b) for b in benchmarks}
        figures["RL training reward"] = reward_figure({k: v for k, v in curves.items() if v})
        if modit_result:
            figures["MO-DiT+HPPO: purity vs attribute frontier"] = modit_result["frontier_png"]
        with production.writing() as tmp:
            (tmp / "report.md").write_text(markdown)
            (tmp / "report.html").write_text(render_html(markdown, figures))
        with mlflow.run("evaluation_report") as run:
            run.log_artifact(str(production.path / "report.md"))
            run.log_artifact(str(production.path / "report.html"))
        html_path = str(production.path / "report.html")
        return production.output(production.record(FileRecord), {
            "report": dg.MetadataValue.md(markdown), "html": dg.MetadataValue.path(html_path)})

    return [latency_benchmark, evaluation_report]


def _folm_history(model_dir: str) -> list[dict]:
    from r4t_pipeline.folm.grpo import META_FILE

    meta = Path(model_dir) / META_FILE
    return json.loads(meta.read_text()).get("history", []) if meta.exists() else []
