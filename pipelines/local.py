"""Run the whole DAG on this machine with kfp.local, no cluster.

kfp.local's SubprocessRunner(use_venv=False) runs each component in a subprocess of this
interpreter, in the order of the DAG, passing artifacts through folders under
`<out>/kfp/<run>/<task>/<output>`; its log lines are the run's progress. Caching is off, so
every run recomputes every step.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from pipelines.params import PipelineParams

PIPELINE_NAME = "distillery"


class PipelineFailed(RuntimeError):
    """A task of the local run failed; its own error is in the log above."""


def run_local(params: PipelineParams, out: Path, source_uri: str = "") -> dict[str, Path]:
    """Run the pipeline; return {"task/output": path} for every artifact the run wrote."""
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
        raise PipelineFailed(f"local pipeline run failed: {err}") from None
    runs = sorted((p for p in root.iterdir() if p.name not in before and p.name.startswith(PIPELINE_NAME)),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise PipelineFailed(f"the run finished but wrote nothing under {root}")
    run_dir = runs[-1]
    latest = out / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.relative_to(out))
    artifacts = {f"{task.name}/{output.name}": output
                 for task in sorted(run_dir.iterdir()) if task.is_dir()
                 for output in sorted(task.iterdir())}
    print(f"pipeline {PIPELINE_NAME}: finished in {time.perf_counter() - started:.1f}s, run folder {run_dir}")
    return artifacts


def print_artifacts(artifacts: dict[str, Path]) -> None:
    """One line per artifact: task/output and where it is."""
    width = max((len(k) for k in artifacts), default=0)
    print("artifacts:")
    for name, path in artifacts.items():
        print(f"  {name:<{width}}  {path}")
