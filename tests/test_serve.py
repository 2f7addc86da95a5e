"""`r4t serve` on the smoke graph's artefacts: a real uvicorn server in this process on a loopback port, driven
over HTTP: every endpoint, every kind of bad input (a 4xx JSON error, never a 500), micro-batching, hot reload
under concurrent requests, the full queue, and the loopback default."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import POLYVORE

from r4t_pipeline.loadgen import free_port
from r4t_pipeline.records import RecordStore
from r4t_pipeline.settings import load_settings

SERVE = {"reload_seconds": 0.2, "max_wait_ms": 30, "max_queue": 64, "request_timeout_seconds": 60}


class Running:
    """A uvicorn server with the app, in a thread of this process."""

    def __init__(self, settings):
        import uvicorn

        from r4t_pipeline.serve import create_app

        self.app = create_app(settings)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return self.client
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and self.thread.is_alive(), "the service did not become ready"
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def served(smoke, tmp_path):
    """Settings whose record store is a copy of the smoke graph's (tests may write new records into it)."""
    settings = load_settings("smoke", config_path="/dev/null",
                             overrides={"work_dir": str(tmp_path), "catalogs": POLYVORE, "serve": SERVE})
    shutil.copytree(smoke.records.root, settings.records_dir)
    return settings


@pytest.fixture
def client(served):
    with Running(served) as http:
        yield http


def fanout(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/v1/fanout", json={"catalog": "polyvore", **body})


def test_health_models_and_metrics(client):
    assert client.get("/healthz").json() == {"ready": True, "models": 6}
    models = client.get("/v1/models").json()
    served = {(m["catalog"], m["regime"], m["method"]) for m in models["models"]}
    assert served == {("polyvore", r, m) for r in ("oar", "wscr") for m in ("r4t_diffusion", "r4t_folm", "no_fanout")}
    diffusion = next(m for m in models["models"] if m["method"] == "r4t_diffusion" and m["regime"] == "wscr")
    checkpoint = diffusion["artefacts"]["polyvore/wscr/diffusion_checkpoint"]
    assert Path(checkpoint["path"]).is_dir() and checkpoint["version"] and checkpoint["materialised_at"]
    assert "recall@3.5%" in diffusion["evaluation"]
    fanout(client, query="summer linen dress")
    metrics = client.get("/metrics").text
    assert 'r4t_requests_total{endpoint="/v1/fanout",status="200"}' in metrics and "r4t_batch_queries_count" in metrics
    assert 'r4t_request_seconds_count{endpoint="/v1/fanout",method="r4t_diffusion"} 1.0' in metrics
    fanout(client, query="")
    assert 'r4t_requests_total{endpoint="/v1/fanout",status="422"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("method", ["r4t_diffusion", "r4t_folm", "no_fanout"])
def test_fanout_returns_items_per_direction(client, method):
    response = fanout(client, queries=["summer linen dress", "black leather boots"], method=method, k=3)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["method"] == method and len(payload["results"]) == 2
    directions = payload["results"][0]["directions"]
    # the diffusion model writes K = 10 directions, a text FOLM as many sub-queries as it parses
    expected = {"no_fanout": 1, "r4t_diffusion": 10}.get(method, len(directions))
    assert len(directions) == expected and 1 <= len(directions) <= 10
    assert all(1 <= len(d["items"]) <= 3 and d["items"][0]["id"] for d in directions)
    assert (directions[0]["subquery"] is not None) == (method == "r4t_folm")
    oar = fanout(client, query="boho festival", regime="oar", method=method, k=1).json()
    assert oar["regime"] == "oar" and oar["results"][0]["merged"]


def test_expand_returns_items_with_flags(client, smoke):
    from r4t_pipeline.modit.tasks import TaskData

    data = TaskData.load(Path(smoke.records.read("modit/polyvore_likes/task_data").path) / "task")
    seeds = [str(data.item_ids[n]) for n in data.seed_sets["item"]["test"].members(0)]
    response = client.post("/v1/expand", json={"catalog": "polyvore", "task": "likes", "seeds": seeds, "k": 5})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["task"] == "polyvore_likes" and len(payload["items"]) == 5
    assert not set(seeds) & {i["item_id"] for i in payload["items"]}
    assert all({"has_attribute", "in_pattern", "likes"} <= set(i) for i in payload["items"])


BAD_FANOUTS = {
    "empty query": ({"query": "  "}, 422, "query 0 is empty"),
    "over-long query": ({"query": "x" * 501}, 422, "at most 500"),
    "no query": ({}, 422, "exactly one of `query`"),
    "both": ({"query": "a", "queries": ["b"]}, 422, "exactly one of `query`"),
    "empty list": ({"queries": []}, 422, "`queries` is empty"),
    "unknown catalog": ({"query": "a", "catalog": "shoes"}, 404, "unknown catalog 'shoes'"),
    "unknown regime": ({"query": "a", "regime": "music"}, 422, "regime"),
    "unknown method": ({"query": "a", "method": "magic"}, 422, "unknown method 'magic'"),
    "method not served": ({"query": "a", "method": "best_of_n"}, 404, "not served"),
    "k zero": ({"query": "a", "k": 0}, 422, "k:"),
    "k too large": ({"query": "a", "k": 1000}, 422, "k:"),
    "pool zero": ({"query": "a", "pool": 0}, 422, "pool:"),
    "unknown field": ({"query": "a", "topk": 3}, 422, "topk"),
    "wrong type": ({"query": 3}, 422, "query:"),
    "query kept alone": ({"query": "a", "method": "no_fanout", "keep_query": True}, 422, "is the query alone"),
}


@pytest.mark.parametrize("body, status, message", BAD_FANOUTS.values(), ids=BAD_FANOUTS.keys())
def test_bad_fanout_requests_get_a_4xx_json_error(client, body, status, message):
    response = client.post("/v1/fanout", json={"catalog": "polyvore", **body})
    assert response.status_code == status and message in response.json()["error"], response.text


def test_bad_expand_requests_and_malformed_json_get_4xx(client):
    def expand(**body):
        return client.post("/v1/expand", json={"catalog": "polyvore", "task": "likes", "seeds": ["x"], **body})

    cases = [(expand(seeds=["nope-1", "nope-2"]), 422, "unknown item id(s)"),
             (expand(seeds=[]), 422, "seeds"), (expand(seeds=[" "]), 422, "non-empty"),
             (expand(task="color"), 404, "unknown task 'color'"), (expand(catalog="shoes"), 404, "unknown catalog"),
             (expand(method="magic"), 422, "unknown method 'magic'"), (expand(k=0), 422, "k:"),
             (client.post("/v1/fanout", content=b"{not json", headers={"content-type": "application/json"}), 422,
              "JSON"),
             (client.post("/v1/fanout", content=b"[1, 2]", headers={"content-type": "application/json"}), 422, "")]
    for response, status, message in cases:
        assert response.status_code == status and message in response.json()["error"], response.text


def test_a_request_may_keep_the_query_as_the_first_direction(client):
    """The same seed's fan-out, with the query's own top items first; requests that differ only in keep_query
    arriving together are answered from their own passes."""
    body = {"query": "summer linen dress", "regime": "oar", "k": 2, "seed": 4}
    with ThreadPoolExecutor(2) as pool:
        plain, kept = pool.map(lambda keep: fanout(client, **body, keep_query=keep).json(), (False, True))
    alone = fanout(client, query=body["query"], regime="oar", method="no_fanout", k=2).json()
    plain, kept = plain["results"][0]["directions"], kept["results"][0]["directions"]
    assert len(kept) == len(plain) + 1 == 11
    assert kept[0]["items"] == alone["results"][0]["directions"][0]["items"]
    assert kept[1:] == plain


def test_concurrent_requests_share_a_forward_pass(client):
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda n: fanout(client, query=f"red dress {n}", seed=0), range(8)))
    assert all(r.status_code == 200 for r in responses)
    metrics = client.get("/metrics").text
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('r4t_batch_queries_count{method="r4t_diffusion"}'))
    assert count < 8  # fewer forward passes than requests


def test_hot_reload_swaps_the_model_without_failing_a_request(served, client):
    store = RecordStore(served.records_dir)
    old = store.read("polyvore/wscr/diffusion_checkpoint")
    failures, answered, stop = [], [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            response = fanout(client, query="winter wool coat")
            (answered if response.status_code == 200 else failures).append(response)

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(keep_asking)
        time.sleep(0.5)
        copy = Path(served.root) / "new-diffusion"
        shutil.copytree(old.path, copy)
        store.write(old.model_copy(update={"version": "new0000000000000", "path": str(copy), "model": str(copy)}))
        deadline = time.time() + 60
        while time.time() < deadline:
            versions = [m["artefacts"].get("polyvore/wscr/diffusion_checkpoint", {}).get("version")
                        for m in client.get("/v1/models").json()["models"]]
            if "new0000000000000" in versions:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # requests on the new model too
        stop.set()
    assert "new0000000000000" in versions, "the new checkpoint was not swapped in"
    assert not failures and len(answered) > 3, [r.text for r in failures[:3]]
    assert fanout(client, query="winter wool coat").json()["model_version"][
        "polyvore/wscr/diffusion_checkpoint"] == "new0000000000000"


def test_a_full_queue_answers_503_and_a_slow_answer_504(served):
    from r4t_pipeline.serve import ApiError, LoadedModel, Service

    async def scenario():
        service = Service(served.model_copy(update={"serve": served.serve.model_copy(
            update={"max_queue": 1, "request_timeout_seconds": 0.2})}))
        model = LoadedModel("polyvore", "wscr", "no_fanout", retriever=None, records={}, loaded_at=0.0)
        model.queue = asyncio.Queue(1)  # no worker: nothing is taken off the queue
        waiting = asyncio.create_task(service.submit(model, ["a"], 10, 0))
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as full:
            await service.submit(model, ["b"], 10, 0)
        with pytest.raises(ApiError) as slow:
            await waiting
        return full.value, slow.value

    full, slow = asyncio.run(scenario())
    assert full.status == 503 and "busy" in full.message
    assert slow.status == 504


def test_the_service_binds_loopback_by_default(monkeypatch, served, tmp_path):
    import r4t_pipeline.serve as serve_module
    from r4t_pipeline.cli import main
    from r4t_pipeline.settings import Settings

    assert Settings().serve.host == "127.0.0.1"
    config = tmp_path / "deploy.yaml"
    config.write_text(f"profile: smoke\nwork_dir: {tmp_path}\ncatalogs: {{polyvore: {{builtin: polyvore}}}}\n")
    monkeypatch.setenv("R4T_CONFIG", str(config))
    bound = {}
    monkeypatch.setattr(serve_module, "serve", lambda settings, host, port, catalogs: bound.update(host=host,
                                                                                                     port=port))
    assert main(["serve"]) == 0 and bound == {"host": "127.0.0.1", "port": 8080}
    assert main(["serve", "--host", "0.0.0.0", "--port", "9000"]) == 0 and bound == {"host": "0.0.0.0", "port": 9000}
