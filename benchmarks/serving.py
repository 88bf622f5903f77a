"""Serving, measured: throughput and p50/p95 latency at concurrency 1, 4 and 16 through
tritonclient against a real tritonserver, with Triton's dynamic batching on and off.

    .venv/bin/python benchmarks/serving.py --checkpoint runs/latest/quantize/model/model
    .venv/bin/python benchmarks/serving.py --checkpoint runs/latest/quantize/model/model --requests 96 --model score

Exports the model folder (float or INT8) into a fresh Triton repository, starts the server from
the nvidia-pytriton wheel, answers serve.check's probes first (so a broken export is not timed),
then runs the sweep (components/serve/loadtest.py: closed-loop client threads, one gRPC client
each; batching off is the same model reloaded without its dynamic_batching block). Prints one
row per (batching, concurrency) and the batching-on / batching-off throughput ratio per
concurrency, measured in this one run. perf_analyzer is not in the wheel, hence tritonclient.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from components.serve.check import run_check
from components.serve.config import ServeConfig
from components.serve.export import export_repository
from components.serve.loadtest import run_loadtest
from components.serve.server import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a model folder, e.g. runs/latest/quantize/model/model")
    parser.add_argument("--requests", type=int, default=64, help="requests per (batching, concurrency) point")
    parser.add_argument("--model", choices=["generate", "score"], default="generate")
    parser.add_argument("--max-tokens", type=int, default=16, help="generate: tokens per request")
    parser.add_argument("--png", help="also plot the sweep here")
    args = parser.parse_args()
    cfg = ServeConfig()
    cfg.loadtest.concurrency = [1, 4, 16]
    cfg.loadtest.requests_per_level = args.requests
    cfg.loadtest.model = args.model
    cfg.loadtest.max_tokens = args.max_tokens
    repo = Path(tempfile.mkdtemp(prefix="distillery-bench-triton-")) / "repo"
    export_repository(args.checkpoint, repo, cfg=cfg.export)
    with TritonServer(repo, cfg.server, log_path=repo.parent / "tritonserver.log") as server:
        run_check(server, repo, cfg.export.name, None, None, cfg.check)
        result = run_loadtest(server, repo, cfg.loadtest, cfg.export.name, png=args.png)
    rows = result["rows"]
    print(f"\n## Triton serving: {args.model} ({args.max_tokens} tokens per request), {args.requests} requests "
          f"per point, gRPC, {os.cpu_count()} CPU cores\n")
    print(result["table"])
    on = {r["concurrency"]: r for r in rows if r["batching"]}
    off = {r["concurrency"]: r for r in rows if not r["batching"]}
    print("\n| concurrency | throughput batching on / off | p95 on / off |")
    print("|---|---|---|")
    for c in sorted(on):
        if c in off and off[c]["throughput_rps"] > 0 and off[c]["p95_ms"] > 0:
            print(f"| {c} | {on[c]['throughput_rps'] / off[c]['throughput_rps']:.2f} | "
                  f"{on[c]['p95_ms'] / off[c]['p95_ms']:.2f} |")
    print(f"\nmodel {args.checkpoint}; repository and server log in {repo.parent}")


if __name__ == "__main__":
    main()
