"""serve.loadtest at small scale against the real server: sane rows, a table, a plot, and the
exported config restored afterwards."""

from __future__ import annotations

from components.serve.config import LoadtestConfig
from components.serve.loadtest import run_loadtest


def test_loadtest_rows_are_sane(server, repository, tmp_path):
    cfg = LoadtestConfig(concurrency=[1, 4], requests_per_level=12, warmup=2, model="score", protocol="grpc",
                         prompt="1 + 2 = 3", batching=[True, False])
    result = run_loadtest(server, repository, cfg, png=tmp_path / "load.png")
    rows = result["rows"]
    assert [(r["batching"], r["concurrency"]) for r in rows] == [(True, 1), (True, 4), (False, 1), (False, 4)]
    for r in rows:
        assert r["errors"] == 0 and r["requests"] == 12
        assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"]
        assert r["mean_batch"] >= 1.0
    assert all(r["mean_batch"] == 1.0 for r in rows if not r["batching"])  # no batcher: one request per run
    assert result["table"].splitlines()[0].startswith("| model | batching |") and len(result["table"].splitlines()) == 6
    assert (tmp_path / "load.png").stat().st_size > 1000
    client = server.client("http")
    try:  # back on the exported config.pbtxt (dynamic batching on)
        assert "dynamic_batching" in client.get_model_config("distillery_score")
    finally:
        client.close()


def test_loadtest_generate_over_http(server, repository):
    cfg = LoadtestConfig(concurrency=[2], requests_per_level=4, warmup=0, model="generate", protocol="http",
                         max_tokens=4, batching=[True])
    (row,) = run_loadtest(server, repository, cfg)["rows"]
    assert row["errors"] == 0 and row["throughput_rps"] > 0
