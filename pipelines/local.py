"""Run the whole DAG on this machine with kfp.local, no cluster.

kfp.local's SubprocessRunner(use_venv=False) runs each component in a subprocess of this
interpreter, in the order of the DAG, passing artifacts through folders under
`<out>/kfp/<run>/<task>/<output>`; its log lines are the run's progress. Caching is off, so
every run recomputes every step.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.params import PipelineParams

PIPELINE_NAME = "distillery"


@dataclass
class Artifact:
    """An output artifact of a local run: where it is, and its KFP metadata (metrics live there)."""

    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)


class PipelineFailed(RuntimeError):
    """A task of the local run failed; its own error is in the log above."""


def run_local(params: PipelineParams, out: Path, source_uri: str = "") -> dict[str, Artifact]:
    """Run the pipeline; return {"task/output": Artifact} for every artifact the run wrote."""
    from kfp import local

    from pipelines.pipeline import build_pipeline

    out = Path(out).resolve()
    root = out / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    # the component image is ours and this interpreter has the same packages; display names and
    # Kubernetes settings are for the cluster: neither warning says anything useful here
    warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
    started = time.perf_counter()
    try:
        build_pipeline(params)(source_uri=source_uri)
    except RuntimeError as err:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # kfp colours its messages for terminals
        raise PipelineFailed(f"local pipeline run failed: {plain} (the task's error is in the log above)") from None
    runs = sorted((p for p in root.iterdir() if p.name not in before and p.name.startswith(PIPELINE_NAME)),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise PipelineFailed(f"the run finished but wrote nothing under {root}")
    run_dir = runs[-1]
    latest = out / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.relative_to(out))
    artifacts = collect_artifacts(run_dir)
    print(f"pipeline {PIPELINE_NAME}: finished in {time.perf_counter() - started:.1f}s, run folder {run_dir}")
    return artifacts


def collect_artifacts(run_dir: Path) -> dict[str, Artifact]:
    """Every task's output artifacts, from the executor_output.json files kfp.local writes."""
    found: dict[str, Artifact] = {}
    for out_file in sorted(run_dir.glob("*/executor_output.json")):
        outputs = json.loads(out_file.read_text()).get("artifacts", {})
        for name, entry in outputs.items():
            for art in entry.get("artifacts", []):
                found[f"{out_file.parent.name}/{name}"] = Artifact(Path(art["uri"]), art.get("metadata") or {})
    return found


def print_artifacts(artifacts: dict[str, Artifact]) -> None:
    """One line per artifact: task/output and where it is (metrics: their values)."""
    width = max((len(k) for k in artifacts), default=0)
    print("artifacts:")
    for name, art in artifacts.items():
        where = str(art.path) if art.path.exists() else ", ".join(f"{k}={v}" for k, v in art.metadata.items())
        print(f"  {name:<{width}}  {where}")
