"""registry.promote as the pipeline's last step: register the checked candidate and move it to
staging only when it passes the gate against production.

    distillery release --model runs/quantize/model --check runs/serve/check.json \
        --loadtest runs/serve/loadtest.json --out runs/release

The candidate's gate metrics come from the quantize step's metrics.json (held-out accuracy,
format rate and perplexity of the INT8 model, its size) and the load test (p50/p95 latency of
`generate` at concurrency 1 with batching on). A candidate that fails the gate is registered
(the version exists, with its evidence) but not promoted; the step still succeeds and its
report says why, so a scheduled retraining that produced a worse model leaves production as it
was. `promote --to production` is a person's decision (`distillery promote VERSION --to
production`), taken after looking at staging.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from components.registry.config import RegistryConfig
from components.registry.errors import GateError


def candidate_metrics(quantize: dict[str, Any], loadtest: dict[str, Any] | None = None) -> dict[str, float]:
    """The gate's view of a candidate: quantize's INT8 figures and the single-client latency."""
    out: dict[str, float] = {}
    for key, source in (("accuracy", "int8_accuracy"), ("format_rate", "int8_format"),
                        ("perplexity", "int8_perplexity"), ("size_bytes", "int8_bytes")):
        if isinstance(quantize.get(source), (int, float)) and math.isfinite(quantize[source]):
            out[key] = float(quantize[source])
    for row in (loadtest or {}).get("rows", []):
        if row.get("model") == "generate" and row.get("batching") and row.get("concurrency") == 1:
            out["p50_ms"], out["p95_ms"] = float(row["p50_ms"]), float(row["p95_ms"])
    return out


def run_files(cfg: RegistryConfig, model_folder: str | os.PathLike, check_path: str | os.PathLike,
              out_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None,
              loadtest_path: str | os.PathLike | None = None, actor: str | None = None) -> dict[str, Any]:
    """registry.promote from files, as the CLI (`distillery release`), the KFP component and the DVC
    stage all call it: the quantize step's metrics.json (default: beside `model_folder`), the
    serve.check report and, optionally, its loadtest.json; each read and checked (one line naming
    the file) before anything is registered, then `run`."""
    from components.registry.errors import RegistryError
    from components.registry.records import load_report

    model = Path(model_folder)
    metrics, _ = load_report(metrics_path, model.parent / "metrics.json", "quantize step's metrics")
    check, _ = load_report(check_path, Path(check_path), "serve.check report")
    rows = None
    if loadtest_path is not None:
        try:
            rows = json.loads(Path(loadtest_path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RegistryError(f"{loadtest_path}: not a readable load-test JSON: {err}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RegistryError(f"{loadtest_path}: expected a list of rows (serve.check's loadtest.json)")
    return run(cfg, model, metrics, check, {"rows": rows} if rows is not None else None, out_dir, actor)


def run(cfg: RegistryConfig, model_folder: str | os.PathLike, quantize_metrics: dict[str, Any],
        check: dict[str, Any], loadtest: dict[str, Any] | None, out_dir: str | os.PathLike,
        actor: str | None = None) -> dict[str, Any]:
    """Register `model_folder` with its evidence, try staging; promotion.json and promotion.md
    in `out_dir`. Returns {version, promoted, staging, production, metrics}."""
    from components.registry.artifact import inspect_folder
    from components.registry.registry import Registry

    out = Path(out_dir)
    metrics = candidate_metrics(quantize_metrics, loadtest)
    inspect_folder(model_folder, cfg)  # a refused artifact leaves no registry and no report behind
    reg = Registry.init(cfg.root, cfg, actor)
    registration = reg.register(model_folder, cfg.name, metrics, check)
    version = registration.version
    try:
        change = reg.promote(cfg.name, version, to="staging", note="pipeline run")
        promoted, status = True, change.status
        table = change.report.table() if change.report is not None else ""
    except GateError as err:
        promoted, status = False, "refused by the gate"
        table = err.report.table()
    result = {"version": version, "tag": registration.tag, "promoted": promoted, "status": status,
              "staging": reg.current(cfg.name, "staging"), "production": reg.current(cfg.name, "production"),
              "metrics": metrics, "registry": str(Path(cfg.root).resolve())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "promotion.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [f"# {cfg.name} {version}: {'promoted to staging' if promoted else 'NOT promoted'} ({status})", "",
             f"staging: {result['staging']}, production: {result['production']}", "", "```", table, "```", "",
             "| metric | value |", "|---|---|", *[f"| {k} | {v:.6g} |" for k, v in metrics.items()], "",
             f"next: `distillery promote {version} --to production --registry {result['registry']}` once "
             f"staging looks right; `distillery rollback --registry {result['registry']}` puts production back."]
    (out / "promotion.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result
