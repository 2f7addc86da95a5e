"""Evaluation assets: the five methods side by side per domain and regime, the fan-out latency
benchmark, and the report that a user reads to decide whether R4T is worth deploying."""

import json
from pathlib import Path

import dagster as dg

from r4t_pipeline import stack
from r4t_pipeline.bench import run_benchmark
from r4t_pipeline.defs.artefacts import Artefact
from r4t_pipeline.defs.foundation import version
from r4t_pipeline.defs.resources import MlflowTracking
from r4t_pipeline.evaluation import run_evaluation
from r4t_pipeline.io import atomic_dir, write_json
from r4t_pipeline.report import (
    latency_figure,
    metrics_table,
    render_html,
    render_markdown,
    reward_figure,
    reward_table,
)
from r4t_pipeline.settings import Settings


def evaluation_asset(settings: Settings, domain: str, regime: str):
    prefix = [domain, regime]

    @dg.asset(key=[*prefix, "evaluation"], group_name="evaluation", kinds={"json"},
              ins={"folm_base": dg.AssetIn(key=[domain, "folm_base"]),
                   "folm": dg.AssetIn(key=[*prefix, "folm_checkpoint"]),
                   "diffusion": dg.AssetIn(key=[*prefix, "diffusion_checkpoint"])},
              deps=[[domain, "broad_queries"], [domain, "embedding_index"]],
              code_version=version(settings.evaluation.version()),
              description=f"No fan-out, zero-shot, Best-of-N, R4T-FOLM and R4T-Diffusion on the {domain} "
                          f"{regime.upper()} test split.")
    def evaluation(mlflow: MlflowTracking, folm_base: Artefact, folm: Artefact,
                   diffusion: Artefact) -> dg.Output[Artefact]:
        with mlflow.run(f"{domain}/{regime}/evaluation", params=settings.evaluation.model_dump()) as run:
            result = run_evaluation(settings, domain, regime)
            run.log(0, {f"{method}/{name}": value[0] for method, values in result["metrics"].items()
                        for name, value in values.items()})
        path = stack.stage_dir(settings, domain, regime, "evaluation") / "metrics.json"
        write_json(path, result)
        return dg.Output(Artefact(domain=domain, path=str(path)),
                         metadata={"table": dg.MetadataValue.md(metrics_table(result)),
                                   "validation_reward": dg.MetadataValue.md(reward_table(result)),
                                   "queries": result["queries"]})

    return evaluation


def report_assets(settings: Settings) -> list:
    domain, regime = settings.domains[0], settings.regimes[0]
    cfg = settings.evaluation
    evaluations = [[d, r, "evaluation"] for d in settings.domains for r in settings.regimes]

    @dg.asset(key=["latency_benchmark"], group_name="evaluation", kinds={"json"},
              ins={"diffusion": dg.AssetIn(key=[domain, regime, "diffusion_checkpoint"]),
                   "folm": dg.AssetIn(key=[domain, regime, "folm_checkpoint"])},
              code_version=version(cfg.latency_batch_sizes, cfg.latency_repeats, cfg.latency_budget_seconds),
              description="Fan-out latency per batch size for every method on this machine (median over repeats).")
    def latency_benchmark(diffusion: Artefact, folm: Artefact) -> dg.Output[Artefact]:
        from r4t_pipeline.bench import format_table

        report = run_benchmark(settings, domain, regime, cfg.latency_batch_sizes, cfg.latency_repeats,
                               cfg.latency_budget_seconds)
        path = settings.artefact("evaluation", "latency.json")
        write_json(path, report)
        return dg.Output(Artefact(domain=domain, path=str(path)), metadata={
            "table": dg.MetadataValue.md(format_table(report["results"], cfg.latency_batch_sizes)),
            "device": report["machine"]["device"]})

    @dg.asset(key=["evaluation_report"], group_name="evaluation", kinds={"html"},
              ins={"latency": dg.AssetIn(key=latency_benchmark.key),
                   **{"_".join(key[:2]): dg.AssetIn(key=key) for key in evaluations}},
              code_version=version("report"),
              description="Markdown + self-contained HTML: tables per domain and regime, latency figure, RL reward "
                          "curves and qualitative examples.")
    def evaluation_report(mlflow: MlflowTracking, latency: Artefact, **evaluated: Artefact) -> dg.Output[Artefact]:
        results = [json.loads(Path(a.path).read_text()) for a in evaluated.values()]
        benchmark = json.loads(Path(latency.path).read_text())
        curves = {f"{d}/{r}": _folm_history(settings, d, r) for d in settings.domains for r in settings.regimes}
        markdown = render_markdown(results, benchmark)
        figures = {"Fan-out latency vs batch size": latency_figure(benchmark),
                   "RL training reward": reward_figure({k: v for k, v in curves.items() if v})}
        out = settings.artefact("evaluation", "report")
        with atomic_dir(out) as tmp:
            (tmp / "report.md").write_text(markdown)
            (tmp / "report.html").write_text(render_html(markdown, figures))
        with mlflow.run("evaluation_report") as run:
            run.log_artifact(str(out / "report.md"))
            run.log_artifact(str(out / "report.html"))
        return dg.Output(Artefact(domain="all", path=str(out)), metadata={
            "report": dg.MetadataValue.md(markdown), "html": dg.MetadataValue.path(str(out / "report.html"))})

    return [latency_benchmark, evaluation_report]


def _folm_history(settings: Settings, domain: str, regime: str) -> list[dict]:
    from r4t_pipeline.folm.grpo import META_FILE

    meta = stack.stage_dir(settings, domain, regime, "folm") / META_FILE
    return json.loads(meta.read_text()).get("history", []) if meta.exists() else []
