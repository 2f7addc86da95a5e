"""The optional LLM judge against a real HTTP server on loopback that speaks the OpenAI chat protocol."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from r4t_pipeline.judge import JudgeError, LLMJudge


@pytest.fixture
def endpoint():
    seen, answers = [], []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers.get("Authorization"),
                         json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            content = answers.pop(0) if answers else '{"diversity": 3, "alignment": 3, "groundedness": 4}'
            body = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", seen, answers
    server.shutdown()


def test_judge_sends_the_rubric_and_scales_likert_to_100(endpoint, monkeypatch):
    url, seen, answers = endpoint
    monkeypatch.setenv("JUDGE_KEY", "secret")
    answers.append('Varied and on topic. {"diversity": 4, "alignment": 5, "groundedness": 3, "explanation": "ok"}')
    judge = LLMJudge(url, "judge-model", api_key_env="JUDGE_KEY")
    scores = judge.score("bohemian festival style", [("boho maxi dress", "Free People maxi dress"),
                                                     ("fringe boots", "suede fringe ankle boots")])
    assert scores == {"diversity": 80.0, "alignment": 100.0, "groundedness": 60.0}
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer secret" and body["model"] == "judge-model"
    prompt = body["messages"][0]["content"]
    assert "Request: bohemian festival style" in prompt and "suede fringe ankle boots" in prompt
    assert "1 = Poor" in prompt and "R4T" not in prompt  # the rubric, and no word of the method


def test_judge_errors_name_the_endpoint(endpoint):
    url, _, answers = endpoint
    answers.append("I cannot score this.")
    with pytest.raises(JudgeError, match=r"did not answer the rubric's JSON"):
        LLMJudge(url, "m").score("q", [("a", "b")])
    with pytest.raises(JudgeError, match=r"judge request to http://127.0.0.1:9/chat/completions failed"):
        LLMJudge("http://127.0.0.1:9", "m", timeout=2).score("q", [("a", "b")])


def test_oar_evaluation_adds_judge_scores_when_configured(endpoint, smoke):
    from r4t_pipeline.evaluation import run_evaluation
    from r4t_pipeline.report import metrics_table
    from r4t_pipeline.stack import latest_artefacts

    url, seen, _ = endpoint
    evaluation = smoke.settings.evaluation.model_copy(update={"llm_judge_url": url, "llm_judge_model": "m"})
    settings = smoke.settings.model_copy(update={"evaluation": evaluation})
    records, artefacts = latest_artefacts(settings, "polyvore", "oar", ["no_fanout", "r4t_diffusion"])
    logged = []
    result = run_evaluation(settings, "oar", records["catalog"].path, records["broad_queries"].path, artefacts,
                            methods=("no_fanout", "r4t_diffusion"),
                            log_fn=lambda row, step, means: logged.append((row, step, means)))
    for method in ("no_fanout", "r4t_diffusion"):
        assert result["metrics"][method]["judge_groundedness"] == (80.0, 0.0)
    # each row reaches MLflow as it is done: the methods, the kept-query variant, then the sampler sweep
    sweep = [f"r4t_diffusion@{s.sampler}-{s.steps}" for s in settings.evaluation.sampler_sweep]
    rows = ["no_fanout", "r4t_diffusion", "r4t_diffusion+query", *sweep]
    assert [(row, step) for row, step, _ in logged] == list(zip(rows, range(1, len(rows) + 1)))
    assert logged[1][2]["average"] == result["metrics"]["r4t_diffusion"]["average"][0]
    assert len(seen) == 2 * result["queries"]  # one judge call per query and method
    assert "judge_diversity" in metrics_table(result).splitlines()[0]
