import json
import time

import numpy as np
import pytest

from r4t_pipeline.evaluation import mean_over_runs, paired_differences, run_vendi, specificity, wscr_pool_metrics
from r4t_pipeline.report import metrics_table, render_html, render_markdown
from r4t_pipeline.retrievers import Fanout, RetrievalBatch
from r4t_pipeline.stats import mean_and_error
from r4t_pipeline.timing import time_by_batch_size


def _fanout(directions, ids):
    return Fanout("q", np.asarray(directions, np.float32), ids, [np.ones(len(i)) for i in ids])


def test_recall_and_hit_by_hand():
    batch = RetrievalBatch([_fanout([[1, 0]], [["a", "b", "c"]]), _fanout([[0, 1]], [["x"], ["y"]])], 0.0, 0.0)
    scores = wscr_pool_metrics(batch, [["a", "b", "z", "z"], ["q"]])
    np.testing.assert_allclose(scores["recall"], [2 / 3, 0.0])  # the reference is a set: {a, b, z}
    np.testing.assert_allclose(scores["hit"], [1.0, 0.0])


def test_wscr_scores_are_means_over_the_runs():
    """A reference item found in one run of two counts half; smaller pools are read off each run's candidates."""
    def run(first_direction, first_ids, second_ids):
        return RetrievalBatch([Fanout("q1", np.array([first_direction], np.float32), [first_ids], [np.ones(2)]),
                               Fanout("q2", np.array([[0, 1]], np.float32), [second_ids], [np.ones(2)])], 0, 0)

    runs = [run([1, 0], ["a", "c"], ["y", "z"]), run([0, 1], ["a", "b"], ["x", "y"])]
    query_vectors = np.eye(2, dtype=np.float32)
    scores = mean_over_runs(runs, [["a", "b"], ["x"]], {"2": 2, "1": 1}, query_vectors)
    np.testing.assert_allclose(scores["recall@2"], [75, 50])  # q1: 1/2 then 2/2; q2: 0 then 1/1
    np.testing.assert_allclose(scores["hit@2"], [100, 50])
    np.testing.assert_allclose(scores["recall@1"], [50, 50])  # the first candidate of each run: a, a; y, x
    np.testing.assert_allclose(scores["query_specificity"],  # q1's second run points at q2
                               (specificity(runs[0], query_vectors) + specificity(runs[1], query_vectors)) / 2)
    assert scores["query_specificity"][0] < specificity(runs[0], query_vectors)[0]


def test_a_batch_size_projected_over_the_budget_is_skipped_with_every_larger_one():
    """Sizes are timed in order; one whose time, linear in the batch size from the size before, exceeds the budget
    is skipped (and the sizes after it), so a slow method never runs its largest batches."""
    def run(batch, repeat):
        time.sleep(0.004 * len(batch))  # 4 ms per query, as an autoregressive method pays
        return {"fanout_median_seconds": 0.001}

    results = time_by_batch_size(lambda n: ["q"] * n, run, [1, 8, 256, 16], repeats=2, budget_seconds=0.5,
                                 unit="query")
    assert list(results) == ["1", "8", "16", "256"]  # in size order
    assert all(results[n]["median_seconds"] >= 0.004 * int(n) for n in ("1", "8", "16"))
    assert len(results["16"]["runs"]) == 2 and results["16"]["fanout_median_seconds"] == 0.001
    assert results["256"]["skipped"].startswith("projected ") and "s from batch 16," in results["256"]["skipped"]


def test_vendi_across_runs():
    same = [RetrievalBatch([_fanout([[1, 0], [0, 1]], [["a"], ["b"]])], 0, 0) for _ in range(3)]
    assert abs(run_vendi(same)[0] - 1.0) < 1e-5  # float32 directions
    orthogonal = [RetrievalBatch([_fanout([v], [["a"]])], 0, 0) for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1])]
    assert abs(run_vendi(orthogonal)[0] - 3.0) < 1e-5


def test_mean_and_bootstrap_error():
    mean, err = mean_and_error([1.0, 1.0, 1.0])
    assert (mean, err) == (1.0, 0.0)
    mean, err = mean_and_error(np.arange(100.0))
    assert mean == 49.5 and 2.0 < err < 3.8  # sd / sqrt(n) = 2.9


def test_paired_differences_cancel_what_both_methods_share():
    """Query difficulty shared by two methods drops out of their paired difference: here the per-query scores
    spread over 0-99 (s.e. ~3 each), and one method is the other plus 2 +- 0.5, so the difference is 2 +- ~0.05."""
    rng = np.random.default_rng(0)
    base = rng.permutation(100).astype(float)
    per_query = {"no_fanout": {"average": base}, "zero_shot": {"average": base + 2 + rng.uniform(-0.5, 0.5, 100)},
                 "r4t_folm": {"average": base - 1.0}}
    paired = paired_differences(per_query, ["average"])
    assert [(p["method"], p["against"]) for p in paired] == [("zero_shot", "no_fanout"), ("r4t_folm", "zero_shot")]
    (gain, gain_err), (loss, loss_err) = (p["difference"]["average"] for p in paired)
    assert abs(gain - 2) < 0.1 and gain_err < 0.1 < mean_and_error(base)[1]
    assert loss == pytest.approx(per_query["r4t_folm"]["average"].mean() - per_query["zero_shot"]["average"].mean())
    assert loss_err < 0.1


def test_report_renders_both_tables_in_method_order(smoke):
    evaluations = [json.loads((smoke.path(f"polyvore/{r}/evaluation") / "metrics.json").read_text())
                   for r in ("oar", "wscr")]
    oar_table = metrics_table(evaluations[0]).splitlines()
    assert oar_table[0] == "| method | diversity | alignment | groundedness | average | query_specificity |"
    for evaluation in evaluations:  # the query alone points at itself more than at another test query
        assert evaluation["metrics"]["no_fanout"]["query_specificity"][0] > 0
    assert [row.split("|")[1].strip() for row in oar_table[2:]] == [
        "No fan-out", "Zero-shot fan-out", "Best-of-N", "R4T-FOLM", "R4T-Diffusion", "R4T-Diffusion + query",
        "Supervised set diffusion"]  # smoke: R4T-Diffusion is evaluated again with the query kept
    assert "recall@3.5%" in metrics_table(evaluations[1]) and "vendi" in metrics_table(evaluations[1])
    headroom = evaluations[1]["headroom"]  # Polyvore items carry categories
    pool = max(evaluations[1]["pools"], key=evaluations[1]["pools"].get)
    assert headroom["ceiling"][f"recall@{pool}"][0] > headroom["floor"][f"recall@{pool}"][0]
    markdown = render_markdown(evaluations, [])
    page = render_html(markdown, {"figure": "iVBORw0KGgo="})
    # per regime: methods, training reward, paired differences and R4T-Diffusion with each swept sampler (smoke:
    # DPM-Solver++, 2 steps); WSCR also the category-name headroom
    assert page.count("<table>") == 9 and "| Ceiling: the categories of the reference items" in markdown
    assert markdown.count("| Zero-shot fan-out − No fan-out | ") == 2
    assert markdown.count("query_specificity: how much more the directions point at their own query") == 2
    assert "Each query's scores are means over its 2 independent runs" in markdown  # smoke: runs 2
    recalls = " | ".join(f"recall@{label}" for label in evaluations[1]["pools"])
    assert "| comparison | diversity | average |" in markdown and f"| comparison | {recalls} |" in markdown
    assert "src='data:image/png;base64," in page and "http" not in page
    assert markdown.count("| DPM-Solver++(2M) | 2 | 2 | ") == 2 and "guidance w = " in markdown
    report = (smoke.path("evaluation_report") / "report.md").read_text()
    served = report[report.index("#### Served over HTTP"):report.index("Closed loop:")].splitlines()
    rows = [line.split("|") for line in served if line.startswith("| ") and "clients" not in line]
    assert {r[1].strip() for r in rows} == {"r4t_diffusion", "r4t_folm", "no_fanout"}
    assert all(r[2].strip() == "2" and r[-2].strip() == "0" for r in rows)  # 2 clients, no errors
    html_file = smoke.path("evaluation_report") / "report.html"
    assert html_file.read_text().count("<img") == 3  # latency, RL reward curves, MO-DiT frontier


def test_smaller_pool_is_read_off_the_ranked_candidates():
    from r4t_pipeline.evaluation import truncate_pool

    batch = RetrievalBatch([_fanout([[1, 0], [0, 1]], [["a", "b", "c"], ["d", "e", "f"]])], 0, 0)
    small = truncate_pool(batch, 3)  # two directions: ceil(3 / 2) = 2 each
    assert small.fanouts[0].candidate_ids == [["a", "b"], ["d", "e"]]
    assert wscr_pool_metrics(small, [["c", "d"]])["recall"][0] == 0.5


def test_category_fanouts_name_the_reference_types_or_the_most_frequent_ones():
    from r4t_pipeline.evaluation import CategoryFanout

    categories = {"a": "Boots", "b": "Bags", "c": "Boots", "d": "", "e": "Bags", "f": "Hats"}
    ceiling = CategoryFanout(None, None, categories, k=2, ceiling=True)
    assert ceiling.subqueries("q", ["c", "d", "f", "b"]) == ["Boots", "Hats"]  # distinct, in order, at most K
    assert ceiling.subqueries("winter hats", ["d"]) == ["winter hats"]  # no category: the query itself
    with pytest.raises(ValueError, match="pass reference_ids"):
        ceiling.directions(["q"], seed=0)
    floor = CategoryFanout(None, None, categories, k=2, ceiling=False)
    assert floor.subqueries("q", ["f"]) == ["Boots", "Bags"]  # the same for every query: no intent


RESUMED_METHODS = ("no_fanout", "supervised_diffusion")


def test_an_interrupted_evaluation_goes_on_from_the_rows_it_finished(smoke, tmp_path, monkeypatch):
    """It gives what a fresh run gives, with every row logged again."""
    from r4t_pipeline import stack
    from r4t_pipeline.evaluation import run_evaluation
    from r4t_pipeline.stack import latest_artefacts

    records, artefacts = latest_artefacts(smoke.settings, "polyvore", "oar", list(RESUMED_METHODS))
    build_retriever, built = stack.build_retriever, []

    def evaluate(resume_dir=None, fail_on=None):
        def building(settings, regime, method, *args, **kwargs):
            built.append(method)
            if method == fail_on:
                raise KeyboardInterrupt  # as a stopped run
            return build_retriever(settings, regime, method, *args, **kwargs)

        monkeypatch.setattr(stack, "build_retriever", building)
        logged = []
        result = run_evaluation(smoke.settings, "oar", records["catalog"].path, records["broad_queries"].path,
                                artefacts, methods=RESUMED_METHODS, resume_dir=resume_dir,
                                log_fn=lambda row, step, means: logged.append((row, step)))
        return result, logged

    with pytest.raises(KeyboardInterrupt):
        evaluate(tmp_path / "rows", fail_on="supervised_diffusion")
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["no_fanout.json"]
    built.clear()
    resumed, logged = evaluate(tmp_path / "rows")
    assert built == ["supervised_diffusion"]  # the finished row is read back, not evaluated again
    assert logged == [("no_fanout", 1), ("supervised_diffusion", 2)]  # every row still reaches MLflow

    fresh, _ = evaluate()
    for field in ("paired", "examples", "validation_reward"):
        assert json.dumps(resumed[field]) == json.dumps(fresh[field]), field
    for method in RESUMED_METHODS:  # all but the time each run took
        del resumed["metrics"][method]["fanout_seconds_per_query"], fresh["metrics"][method]["fanout_seconds_per_query"]
        assert resumed["metrics"][method] == fresh["metrics"][method], method


def test_a_damaged_finished_row_is_refused_naming_its_file(tmp_path):
    from r4t_pipeline.evaluation import FinishedRows

    rows = FinishedRows(tmp_path)
    assert rows.put("no_fanout", {"metrics": {"average": (np.float32(1.5), 0.25)}}) == rows.get("no_fanout") == \
        {"metrics": {"average": [1.5, 0.25]}}
    assert rows.names() == ["no_fanout"] and rows.get("zero_shot") is None
    (tmp_path / "zero_shot.json").write_text('{"metrics": {"aver')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'zero_shot.json'}: not a finished evaluation row .*"
                                         r"delete it to evaluate zero_shot again"):
        rows.get("zero_shot")
