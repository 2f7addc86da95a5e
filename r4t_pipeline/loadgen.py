"""`r4t bench --serve`: start `r4t serve` on loopback, drive it with a bounded, self-stopping asyncio client at
several concurrency levels (a fixed number of requests each), and report throughput, latency percentiles and
errors per method as JSON. Traffic goes to 127.0.0.1 only; the server is stopped at the end, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from r4t_pipeline.bench import machine
from r4t_pipeline.settings import CONFIG_ENV, PROFILE_ENV, Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def drive(url: str, bodies: list[dict], concurrency: int, requests: int, timeout: float) -> dict:
    """`requests` POSTs from `concurrency` clients that each send their next request when the last one is answered
    (closed loop); bodies are used in turn. aiohttp, not httpx: the client shares the server's cores, and httpx
    spends about a millisecond more per request there, which the latencies would count."""
    latencies, statuses, next_request = [], {}, iter(range(requests))

    async def client(http: aiohttp.ClientSession) -> None:
        for n in next_request:
            started = time.perf_counter()
            try:
                async with http.post(url, json=bodies[n % len(bodies)]) as response:
                    await response.read()
                    status = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as err:
                status = type(err).__name__
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = 1000 * np.array(latencies)
    return {"requests": requests, "concurrency": concurrency, "seconds": round(wall, 3),
            "throughput_rps": round(requests / wall, 2),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)},
            "errors": sum(n for s, n in statuses.items() if s != "200"), "statuses": statuses}


@contextlib.contextmanager
def running_service(settings: Settings, catalog: str, startup_timeout: float = 600):
    """`r4t serve` with these very settings (handed over as its configuration file) in a child process on a free
    loopback port; yields its base URL once /healthz says ready."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="r4t-serve-", suffix=".log", delete=False)  # noqa: SIM115
    config = tempfile.NamedTemporaryFile("w", prefix="r4t-serve-", suffix=".yaml", delete=False)  # noqa: SIM115
    with config:
        json.dump(settings.model_dump(mode="json"), config)  # JSON is YAML
    cmd = [sys.executable, "-m", "r4t_pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--catalog", catalog]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, CONFIG_ENV: config.name, PROFILE_ENV: settings.profile})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"r4t serve exited with {server.returncode} before it was ready: "
                                   f"{' '.join(Path(log.name).read_text().split()[-60:])}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"r4t serve was not ready within {startup_timeout:.0f} s (log: {log.name})")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)
        Path(config.name).unlink(missing_ok=True)


def serve_benchmark(settings: Settings, catalog: str, regime: str, queries: list[str], methods: list[str],
                    concurrencies: list[int], requests: int, timeout: float = 60.0) -> dict:
    """Every method at every concurrency, one query per request; the text methods get fewer requests when a
    request takes seconds (`requests` // 8, at least 2 per client) so that the run stays bounded."""
    results: dict[str, dict] = {}
    with running_service(settings, catalog) as base:
        url = f"{base}/v1/fanout"
        for method in methods:
            # the default seed, as a client would send: requests with the same seed share a forward pass
            bodies = [{"query": q, "catalog": catalog, "regime": regime, "method": method} for q in queries]
            asyncio.run(drive(url, bodies[:4], 1, 4, timeout))  # warm-up: first-call allocations
            results[method] = {}
            for concurrency in concurrencies:
                n = requests if method in ("r4t_diffusion", "no_fanout", "supervised_diffusion") \
                    else max(requests // 8, 2 * concurrency)
                results[method][str(concurrency)] = asyncio.run(drive(url, bodies, concurrency, n, timeout))
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    batch_lines = [line for line in metrics.splitlines() if line.startswith("r4t_batch_queries_sum")
                   or line.startswith("r4t_batch_queries_count")]
    ratio = {}
    if "r4t_diffusion" in results and "r4t_folm" in results:
        ratio = {c: round(results["r4t_diffusion"][c]["throughput_rps"] / results["r4t_folm"][c]["throughput_rps"], 2)
                 for c in results["r4t_diffusion"] if c in results["r4t_folm"]}
    return {"machine": machine(), "catalog": catalog, "regime": regime,
            "config": {"concurrency": concurrencies, "requests": requests, "methods": methods,
                       "profile": settings.profile, "sampling": settings.diffusion.sampling(),
                       "serve_sampler_steps": settings.serve.sampler_steps,
                       "torch_threads": settings.serve.torch_threads, "max_wait_ms": settings.serve.max_wait_ms,
                       "query_runtime": settings.query_runtime},
            "results": results, "diffusion_over_folm_throughput": ratio, "batch_metrics": batch_lines}


def format_serve_table(report: dict) -> str:
    lines = ["| method | clients | requests/s | p50 ms | p95 ms | p99 ms | errors |", "|---" * 7 + "|"]
    for method, rows in report["results"].items():
        for concurrency, r in rows.items():
            lines.append(f"| {method} | {concurrency} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | "
                         f"{r['p99_ms']} | {r['errors']} |")
    return "\n".join(lines)
