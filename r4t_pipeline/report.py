"""The evaluation report: Markdown (shown in the Dagster UI) and a self-contained HTML page (figures
inlined as PNG), in the shape of the paper's Table 1 (OAR) and Table 2 (WSCR)."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from r4t_pipeline.methods import KEPT_QUERY, METHODS  # noqa: E402

METHOD_NAMES = {name: method.title for name, method in METHODS.items()}
OAR_COLUMNS = ("diversity", "alignment", "groundedness", "average")
SAMPLER_NAMES = {"heun": "Heun (EDM)", "dpm2m": "DPM-Solver++(2M)", "sde": "reverse SDE"}


def _method_order(key: str) -> tuple[int, bool]:
    """Registry order, each method's "+ query" row right after it."""
    return list(METHOD_NAMES).index(key.removesuffix(KEPT_QUERY)), key.endswith(KEPT_QUERY)


def _method_title(key: str) -> str:
    base = key.removesuffix(KEPT_QUERY)
    return METHOD_NAMES.get(base, base) + (" + query" if key.endswith(KEPT_QUERY) else "")


def _cell(value: tuple[float, float], digits: int = 1) -> str:
    mean, err = value
    return f"{mean:.{digits}f} ± {err:.{digits}f}"


def _pool_columns(evaluation: dict) -> list[str]:
    """WSCR: recall and hit at each pool, in the evaluation's pool order."""
    return [f"{m}@{p}" for p in evaluation["pools"] for m in ("recall", "hit")]


def _has_specificity(evaluation: dict) -> bool:
    """Evaluations materialised before the column existed lack it."""
    return "query_specificity" in next(iter(evaluation["metrics"].values()), {})


def metrics_table(evaluation: dict) -> str:
    metrics = evaluation["metrics"]
    if evaluation["regime"] == "oar":
        columns = list(OAR_COLUMNS) + [c for c in next(iter(metrics.values())) if c.startswith("judge_")]
    else:
        columns = _pool_columns(evaluation) + ["vendi"]
    columns += ["query_specificity"] if _has_specificity(evaluation) else []
    header = "| method | " + " | ".join(columns) + " |"
    rows = [header, "|---" * (len(columns) + 1) + "|"]
    for method in sorted(metrics, key=_method_order):
        values = metrics[method]
        digits = [2 if c == "vendi" else 1 for c in columns]
        rows.append(f"| {_method_title(method)} | "
                    + " | ".join(_cell(values[c], d) if c in values else "-" for c, d in zip(columns, digits)) + " |")
    return "\n".join(rows)


def reward_table(evaluation: dict) -> str:
    """The training reward of each method's fan-outs on the validation split (what RL optimised)."""
    rewards = evaluation["validation_reward"]
    terms = [t for t in ("total", "composite", "groundedness", "diversity", "alignment", "coverage", "soft_coverage",
                         "format") if any(t in r for r in rewards.values())]
    rows = ["| method | " + " | ".join(terms) + " |", "|---" * (len(terms) + 1) + "|"]
    for method in sorted(rewards, key=list(METHOD_NAMES).index):
        rows.append(f"| {METHOD_NAMES[method]} | "
                    + " | ".join(f"{rewards[method][t]:.3f}" if t in rewards[method] else "-" for t in terms) + " |")
    return "\n".join(rows)


def sweep_table(evaluation: dict) -> str:
    """R4T-Diffusion with each swept sampler: the headline metrics and the fan-out latency at batch 8."""
    sweep = evaluation.get("sampler_sweep") or []
    if not sweep:
        return ""
    columns = list(OAR_COLUMNS) if evaluation["regime"] == "oar" else [f"recall@{p}" for p in evaluation["pools"]]
    rows = ["| sampler | steps | network calls | " + " | ".join(columns) + " | fan-out ms, batch 8 |",
            "|---" * (len(columns) + 4) + "|"]
    for row in sorted(sweep, key=lambda r: (r["sampler"], r["network_calls"])):
        rows.append(f"| {SAMPLER_NAMES[row['sampler']]} | {row['steps']} | {row['network_calls']} | "
                    + " | ".join(_cell(row["metrics"][c]) for c in columns) + f" | {row['fanout_ms_batch8']:.1f} |")
    sampling = evaluation.get("diffusion_sampling", {})
    evaluated = (f"The table above samples with {SAMPLER_NAMES[sampling['sampler']]}, "
                 f"{sampling.get('sampler_steps') or 'its default'} steps, guidance w = {sampling.get('guidance')}. "
                 if sampling else "")
    return "\n".join(rows) + f"\n\n{evaluated}Fan-out latency includes query encoding (median, this machine)."


def paired_table(evaluation: dict) -> str:
    """The claims as paired differences over the same test queries (see `evaluation.COMPARISONS`)."""
    paired = evaluation.get("paired") or []  # absent from results written before RESULT_VERSION 2
    if not paired:
        return ""
    columns = list(paired[0]["difference"])
    rows = ["| comparison | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in paired:
        rows.append(f"| {_method_title(row['method'])} − {_method_title(row['against'])} | "
                    + " | ".join("{:+.1f} ± {:.1f}".format(*row["difference"][c]) for c in columns) + " |")
    return "\n".join(rows) + (
        "\n\nMean over the same test queries of the first method's score minus the second's, with its bootstrap "
        "standard error: a difference beyond about two standard errors separates the two methods, where their own "
        "error bars above may overlap.")


def headroom_table(evaluation: dict) -> str:
    """WSCR: the category-name fan-outs that bracket the methods (see `evaluation.CategoryFanout`)."""
    headroom = evaluation.get("headroom") or {}
    if not headroom:
        return ""
    columns = _pool_columns(evaluation)
    titles = {"ceiling": "Ceiling: the categories of the reference items (reads the answer)",
              "floor": "Floor: the K most frequent categories, for every query"}
    rows = ["| category-name fan-out | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows += [f"| {titles[bound]} | " + " | ".join(_cell(headroom[bound][c]) for c in columns) + " |"
             for bound in ("ceiling", "floor")]
    return "\n".join(rows) + (
        "\n\nOne direction per category name, embedded like a sub-query, with the methods' pools. The ceiling is not a "
        "method: it shows how far fan-out could go if the sub-queries named the right item types; a method between "
        "the two rows is limited by which types it names.")


def _pool_note(evaluation: dict) -> str:
    kept = (" \"+ query\": the same fan-out with the query kept as one more direction (RAG-Fusion keeps it), the pool "
            "split over K + 1 directions." if any(m.endswith(KEPT_QUERY) for m in evaluation["metrics"]) else "")
    kept += (" query_specificity: how much more the directions point at their own query than at another test query "
             "(x100 cosine); near 0, the method returns the same kind of set whatever the intent."
             if _has_specificity(evaluation) else "")
    if evaluation["regime"] == "oar":
        return ("Embedding proxies (0-100) of the paper's LLM-judge dimensions; K directions, one collection each. "
                "Mean ± bootstrap standard error over test queries." + kept)
    pools = ", ".join(f"{label} = {size:,} candidates" for label, size in evaluation["pools"].items())
    runs = (f"Each query's scores are means over its {evaluation['runs']} independent runs, the Vendi Score taken "
            "across them." if "runs" in evaluation  # absent before WSCR's RESULT_VERSION 4: first-run scores
            else "Vendi across independent runs.")
    return (f"Pools per query: {pools} (the paper's 5K is 3.5% of its catalog; both shown). Recall/Hit in %. "
            f"{runs} Mean ± bootstrap standard error over test queries." + kept)


def _figure_png(draw) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    draw(ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def latency_figure(benchmark: dict) -> str:
    def draw(ax):
        for method, rows in benchmark["results"].items():
            sizes = [int(b) for b, r in rows.items() if "median_seconds" in r]
            ax.plot(sizes, [rows[str(b)]["median_seconds"] for b in sizes], marker="o",
                    label=f"{benchmark['catalog']}: {method}")
        ax.set(xscale="log", yscale="log", xlabel="batch size (queries)", ylabel="seconds per batch (median)",
               title=f"Fan-out latency, {benchmark['machine']['device']}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    return _figure_png(draw)


def reward_figure(curves: dict[str, list[dict[str, float]]]) -> str:
    def draw(ax):
        for name, history in curves.items():
            ax.plot([h.get("reward/total", h.get("reward", float("nan"))) for h in history], label=name)
        ax.set(xlabel="GRPO step", ylabel="mean training reward", title="RL training reward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _figure_png(draw)


def _examples_md(evaluation: dict) -> str:
    lines = []
    for method, examples in evaluation["examples"].items():
        for ex in examples[:1]:
            lines.append(f"**{METHOD_NAMES.get(method, method)}**: *{ex['query']}*")
            for n, d in enumerate(ex["directions"]):
                lines.append(f"{n + 1}. {d['subquery'] or '(direction)'} → {d['top_item']}")
            lines.append("")
    return "\n".join(lines)


def _queries_note(ev: dict) -> str:
    sources = ", ".join(f"{n} {source}" for source, n in sorted(ev.get("query_sources", {}).items()))
    leak = "" if ev.get("leakage") is None else (f"; leakage (share of query words found in the reference items) "
                                                 f"{ev['leakage']:.2f}")
    return f"Test queries: {sources or 'none'}{leak}."


def modit_markdown(evaluation: dict, latency: dict | None) -> list[str]:
    """The MO-DiT+HPPO section: the table per task x protocol with p-values, the goal count, the generator's
    latency per batch of seed sets."""
    from r4t_pipeline.bench import format_table

    k = evaluation["ks"][0]
    goal = evaluation["goal"][f"joint@{k}"]
    parts = ["## MO-DiT+HPPO · pattern-preserving attribute retrieval", "",
             f"Mean ± s.e. over test seed sets (seeds excluded from the results); p-values of HPPO against each "
             f"method on Joint@{k}: Wilcoxon signed-rank over seed sets and a bootstrap over test patterns.", "",
             evaluation["table_markdown"], "",
             f"Joint@{k}: HPPO > MO-DiT in {goal['hppo>modit']} of {goal['cells']} cells "
             f"(significantly in {goal['hppo>modit_significant']}); MO-DiT > stage 1 in {goal['modit>pretrained']}; "
             f"HPPO > every baseline in {goal['hppo>all_baselines']} (significantly over the best baseline in "
             f"{goal['hppo>best_baseline_significant']}).", ""]
    if latency:
        parts += [f"Generator latency, seconds per batch of seed sets ({latency['task']}, "
                  f"{latency['protocol']}-holdout, median):", "",
                  format_table(latency["results"], latency["batch_sizes"]), ""]
    return parts


_RUNTIMES = {"torch": "PyTorch", "onnx": "ONNX Runtime"}


def serve_markdown(serve: dict) -> list[str]:
    """`r4t serve` under closed-loop load on this machine: one query per request, the load generator included."""
    from r4t_pipeline.loadgen import format_serve_table

    cfg = serve["config"]
    sampling = cfg.get("sampling", {})
    steps = cfg.get("serve_sampler_steps") or sampling.get("sampler_steps") or "default"
    ratio = ", ".join(f"{c} clients {r}x" for c, r in serve.get("diffusion_over_folm_throughput", {}).items())
    return [f"#### Served over HTTP (`r4t serve`, {serve['catalog']} {serve['regime'].upper()})", "",
            format_serve_table(serve), "",
            f"Closed loop: each client sends its next request when answered; latencies in ms include HTTP, query "
            f"encoding, micro-batched sampling and search. R4T-Diffusion served with {steps} steps of "
            f"{SAMPLER_NAMES.get(sampling.get('sampler'), 'its sampler')} "
            f"(the sweep above gives their quality); encoder and denoiser in "
            f"{_RUNTIMES[cfg.get('query_runtime', 'torch')]}; {cfg.get('torch_threads') or 'all'} thread(s); the load "
            f"generator runs on the same machine. Throughput, R4T-Diffusion over R4T-FOLM: {ratio or 'n/a'}.", ""]


def render_markdown(evaluations: list[dict], benchmarks: list[dict], modit: dict | None = None,
                    modit_latency: dict | None = None) -> str:
    parts = ["# R4T evaluation report", ""]
    for ev in evaluations:
        table = "Table 1 (OAR)" if ev["regime"] == "oar" else "Table 2 (WSCR)"
        parts += [f"## {ev['catalog']} · {ev['regime'].upper()} ({table} shape, {ev['queries']} test queries)", ""]
        if ev.get("skipped"):
            parts += [f"Not evaluated: {ev['skipped']}.", ""]
            continue
        parts += [metrics_table(ev), "", _pool_note(ev), _queries_note(ev), "",
                  f"Training reward on {ev['validation_queries']} validation queries. No fan-out has one direction, "
                  "so its alignment is 1 and its diversity 1/K by construction (not comparable); no fan-out and "
                  "R4T-Diffusion write no text, so they have no format term: compare them on `composite`.", "",
                  reward_table(ev), ""]
        if paired := paired_table(ev):
            parts += ["### Paired differences", "", paired, ""]
        if headroom := headroom_table(ev):
            parts += ["### Headroom: fan-outs of category names", "", headroom, ""]
        if sweep := sweep_table(ev):
            parts += ["### R4T-Diffusion: samplers against quality and latency", "", sweep, ""]
        parts += ["### Examples", "", _examples_md(ev), ""]
    if benchmarks:
        from r4t_pipeline.bench import format_table

        parts += ["## Fan-out latency (seconds per batch, median)", ""]
        for benchmark in benchmarks:
            sizes = benchmark["config"]["batch_sizes"]
            parts += [f"### {benchmark['catalog']} · {benchmark['regime'].upper()}", "",
                      format_table(benchmark["results"], sizes), "",
                      f"Machine: {benchmark['machine']['device']}, torch {benchmark['machine']['torch']}; query "
                      f"encoder and denoiser in {_RUNTIMES[benchmark['config'].get('query_runtime', 'torch')]}, the "
                      "FOLMs' generation in PyTorch; n/a = skipped: its time, projected from the batch before, exceeds "
                      "the time budget.", ""]
            if serve := benchmark.get("serve"):
                parts += serve_markdown(serve)
    if modit:
        parts += modit_markdown(modit, modit_latency)
    return "\n".join(parts)


def render_html(markdown_text: str, figures: dict[str, str]) -> str:
    """A self-contained page: the Markdown tables rendered as HTML plus inline PNG figures."""
    body, in_table = [], False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        body.append("</table>")
    for title, png in figures.items():
        body.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>R4T evaluation report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
