"""Kubeflow Pipelines components of the serving steps: the KFP interface and nothing else.

Each takes every preset's serve section (`config`, a compile-time constant) and the run's
`preset`, resolved by `preset_config` (components/kfp_io.py).
(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def serve_export(model: Input[Model], preset: str, config: dict, repository: Output[Model],
                 metrics: Output[Metrics]):
    """serve.export: a Triton model repository (<name>_generate, <name>_score, version 1) from the
    quantize step's INT8 model folder, with the ONNX scoring graph when configured."""
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import log_metrics, preset_config
    from components.serve import export
    from components.serve.config import ServeConfig

    cfg = from_dict(ServeConfig, preset_config(config, preset)["serve"], "serve")
    summary = export.run(cfg.export, str(Path(model.path) / "model"), repository.path)
    log_metrics(metrics, {"version": summary["version"], "onnx": bool(summary.get("onnx"))})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def serve_check(repository: Input[Model], preset: str, config: dict, check: Output[Artifact], report: Output[HTML],
                metrics: Output[Metrics]):
    """serve.check: the new version in a real tritonserver, answered over HTTP and gRPC and compared
    with the in-process model; then the load test (throughput, p50/p95, batching on vs off)."""
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import html_page, log_metrics, preset_config
    from components.serve.check import run_step
    from components.serve.config import ServeConfig

    cfg = from_dict(ServeConfig, preset_config(config, preset)["serve"], "serve")
    result = run_step(cfg, repository.path, check.path)
    log_metrics(metrics, {"check_passed": result["check"]["passed"], "check_seconds": result["check"]["seconds"]})
    table = result["loadtest"]["table"] if result["loadtest"] else ""
    html_page(report.path, "serve.check and load test", [str(Path(check.path) / "loadtest.png")],
              pre=f"serve.check passed over {', '.join(cfg.check.protocols)}\n\n{table}")
