"""serve.loadtest: a concurrency sweep through tritonclient, with Triton's dynamic batching on and off.

    from components.serve.loadtest import run_loadtest
    with TritonServer("runs/triton") as server:
        result = run_loadtest(server, "runs/triton", LoadtestConfig(concurrency=[1, 4, 16]), png="load.png")
        print(result["table"])

    distillery loadtest --repository REPOSITORY [--model generate|score] [--png load.png]

Why not perf_analyzer: Triton's own load generator is a separate C++ binary (Triton SDK image /
tritonclient's "perf" extra built from source); the nvidia-pytriton wheel ships only tritonserver
and the python backend, so this sweep uses tritonclient directly: `c` threads, each with its own
client, send requests back to back (closed loop) until `requests_per_level` are answered.

For each `batching` setting the model is reloaded with its own config (config.pbtxt as exported,
read back with get_model_config) with the `dynamic_batching` block kept or removed, passed as the
load API's config override; config.pbtxt on disk is never touched, and a last load with the
config as read puts it back (a plain load would not: Triton keeps using an override until the
model's files change). Rows carry throughput (requests/s), p50/p95 latency (ms), errors, and the
mean batch the model executed (inference_count / execution_count deltas of Triton's statistics),
which shows whether requests were actually batched.

On a 2-core CPU the numbers are small and noisy; they show the shape (batching helps once
concurrency > 1), not a capacity figure.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from components.serve import client as calls
from components.serve.config import LoadtestConfig, ServeConfig
from components.serve.export import MODEL_DIR, model_name, versions
from components.serve.server import TritonServer


def _stats(server: TritonServer, model: str) -> tuple[int, int]:
    client = server.client("http")
    try:
        s = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return sum(int(m.get("inference_count", 0)) for m in s), sum(int(m.get("execution_count", 0)) for m in s)


def sweep_point(server: TritonServer, model: str, request, concurrency: int, n: int, protocol: str) -> dict:
    """`n` requests from `concurrency` threads, back to back; `request(client)` sends one."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        client = server.client(protocol)
        try:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                t = time.perf_counter()
                try:
                    request(client)
                    ok = True
                except Exception:  # noqa: BLE001 - counted, the sweep goes on
                    ok = False
                dt = time.perf_counter() - t
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors[0] += 1
        finally:
            client.close()

    inf0, exe0 = _stats(server, model)
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    inf1, exe1 = _stats(server, model)
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": n, "errors": errors[0],
            "throughput_rps": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "mean_batch": round((inf1 - inf0) / max(1, exe1 - exe0), 2)}


def run_loadtest(server: TritonServer, repository: str | os.PathLike, cfg: LoadtestConfig | None = None,
                 name: str = "distillery", png: str | os.PathLike | None = None) -> dict:
    """The sweep over cfg.batching x cfg.concurrency; returns {"rows": [...], "table": markdown}."""
    from components.model import load_tokenizer

    cfg = cfg or LoadtestConfig()
    model = model_name(name, cfg.model)
    have = versions(Path(repository) / model)
    if not have:
        raise FileNotFoundError(f"{Path(repository) / model}: no versions")
    if cfg.model == "generate":
        def request(client):
            calls.generate(client, model, [cfg.prompt], max_tokens=cfg.max_tokens, temperature=0.0)
    else:
        tok = load_tokenizer(Path(repository) / model / str(have[-1]) / MODEL_DIR / "tokenizer")
        ids = [tok.encode(cfg.prompt)]
        if len(ids[0]) < 2:
            raise ValueError(f"prompt {cfg.prompt!r} has fewer than 2 tokens; the score model needs 2")

        def request(client):
            calls.score(client, model, ids)

    server.load(model)
    client = server.client("http")
    try:
        exported = client.get_model_config(model)
    finally:
        client.close()
    rows = []
    try:
        for batching in cfg.batching:
            config = {k: v for k, v in exported.items() if k != "dynamic_batching"}
            if batching:
                config["dynamic_batching"] = exported.get("dynamic_batching") or {"max_queue_delay_microseconds": 2000}
            server.load(model, config=config)
            for c in cfg.concurrency:
                if cfg.warmup:
                    sweep_point(server, model, request, c, cfg.warmup, cfg.protocol)
                row = sweep_point(server, model, request, c, cfg.requests_per_level, cfg.protocol)
                rows.append({"model": cfg.model, "batching": batching, "protocol": cfg.protocol, **row})
    finally:  # back to the exported config (a plain load would keep the override)
        server.load(model, config=exported)
    if png:
        plot(rows, png)
    return {"rows": rows, "table": to_markdown(rows)}


def to_markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    cols = ["model", "batching", "protocol", "concurrency", "requests", "errors", "throughput_rps", "p50_ms",
            "p95_ms", "mean_batch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]).lower() if isinstance(r[c], bool) else str(r[c]) for c in cols) + " |"
              for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], png: str | os.PathLike) -> Path:
    """Throughput and p95 latency against concurrency, one line per batching setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for batching in sorted({r["batching"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["batching"] == batching]
        label = "dynamic batching" if batching else "no batching"
        a.plot([r["concurrency"] for r in sel], [r["throughput_rps"] for r in sel], "o-", label=label)
        b.plot([r["concurrency"] for r in sel], [r["p95_ms"] for r in sel], "o-", label=label)
    for ax, ylabel in ((a, "requests / s"), (b, "p95 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)


def run(cfg: ServeConfig, repository: str | os.PathLike, png: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None) -> dict:
    """The serve.loadtest step: a fresh local server on `repository`, `run_loadtest`, stopped."""
    with TritonServer(repository, cfg.server, log_path=log_path) as server:
        return run_loadtest(server, repository, cfg.loadtest, cfg.export.name, png)
