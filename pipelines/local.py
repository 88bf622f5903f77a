"""Run the whole DAG on this machine with kfp.local, no cluster; run it again to resume.

    distillery run --preset small --out runs          # again after an interruption: resumes

kfp.local's SubprocessRunner(use_venv=False) runs each component in a subprocess of this
interpreter, in the order of the DAG, passing artifacts through folders under
`<out>/kfp/<run>/<task>/<output>`. The console (pipelines/console.py) shows a line per step and
files the rest in `<out>/logs/<task>.log`.

Resume, two ways at once:
- kfp.local's cache (`<out>/kfp/.kfp_cache`): a step whose component, arguments (its inputs'
  artifact URIs included) and code are those of a step that finished earlier is not run again;
  its outputs are the earlier ones. Every task carries $DISTILLERY_CODE, a digest of the suite's
  source, so changed code never reuses old results. ingest reads a file that KFP's key cannot
  see, so locally its key is computed here from the file's content and the step's parameters.
- training steps train in `<out>/checkpoints/<key>` ($DISTILLERY_CHECKPOINT_DIR, the mechanism a
  cluster's checkpoint volume uses; components/kfp_io.py `training_dir`), keyed by their inputs
  and parameters, so an interrupted one continues from its last checkpoint.

`<out>/latest` links the newest run's folder, which holds every task (the ones it ran, and links
to the earlier runs' folders of the ones it found done), `reports/` (each step's HTML page) and
`run.json` (each step's status, wall time and metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from components.kfp_io import CHECKPOINT_ENV
from components.errors import InputError
from pipelines.cluster import PIPELINE_NAME
from pipelines.params import PipelineParams

REPORTS = {"validate": "report", "filter-rows": "report", "train-base": "loss_curve",
           "train-reinforce": "rewards_curve", "evaluate-stages": "report", "promote": "report"}
"""Each step's HTML artifact, copied to `<run>/reports/<task>.html` so a browser opens it as a page."""


class PipelineFailed(InputError, RuntimeError):
    """A task of the local run failed; the console has shown its error and where its log is."""


@dataclass
class LocalRun:
    """What a local run did: its folder, each step as the console saw it, the reports."""

    out: Path
    run_dir: Path
    steps: list  # pipelines.console.Step, in pipeline order
    seconds: float
    reports: dict[str, Path]


def ingest_cache_key(params: PipelineParams, source_uri: str, code: str, arguments: dict | None = None) -> str:
    """What ingest's output depends on: the code, the source file's bytes (or, with no source, the
    generator's parameters), the source mapping, and the run form's values if any (`arguments`:
    generate_rows or source_fields change what ingest writes)."""
    key = {"code": code, "source": source_uri, "source_config": params.as_dict()["source"],
           "generate": params.as_dict()["generate"]}
    if arguments:
        key["arguments"] = arguments
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    if source_uri:
        with open(source_uri, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return "ingest-" + h.hexdigest()[:32]


def run_local(params: PipelineParams, out: Path, source_uri: str = "", verbose: bool = False,
              arguments: dict | None = None) -> LocalRun:
    """Run (or resume) the pipeline into `out`; the console shows its progress on stdout.
    `arguments`: run-form values for the pipeline call (e.g. {"train_steps": 20}), as in the UI."""
    from kfp import local

    from components.artifacts import source_digest
    from pipelines.console import RunConsole
    from pipelines.pipeline import LOCAL_PRESET, TASK_ORDER, LocalSettings, build_pipeline

    out = Path(out).resolve()
    root = out / "kfp"
    root.mkdir(parents=True, exist_ok=True)
    code = source_digest()
    settings = LocalSettings(code=code, ingest_key=ingest_cache_key(params, source_uri, code, arguments))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=True)
    # the component image is ours and this interpreter has the same packages; display names and
    # Kubernetes settings are for the cluster: neither warning says anything useful here
    warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*", category=UserWarning)
    saved = os.environ.get(CHECKPOINT_ENV)
    os.environ[CHECKPOINT_ENV] = str(out / "checkpoints")
    started = time.perf_counter()
    console = RunConsole(TASK_ORDER, root, out / "logs", verbose=verbose)
    try:
        with console:
            build_pipeline({LOCAL_PRESET: params}, LOCAL_PRESET, local=settings)(source_uri=source_uri,
                                                                                  **(arguments or {}))
    except RuntimeError as err:
        failed = [s for s in console.steps.values() if s.status == "failed"]
        what = (f"step {failed[0].name} failed: {console.error or 'see ' + str(out / 'logs' / failed[0].name)}.log"
                if failed else re.sub(r"\x1b\[[0-9;]*m", "", str(err)))
        raise PipelineFailed(f"local pipeline run failed: {what}") from None
    finally:
        if saved is None:
            os.environ.pop(CHECKPOINT_ENV, None)
        else:
            os.environ[CHECKPOINT_ENV] = saved
    run_dir = console.run_dir or _newest_run(root)
    if run_dir is None:
        raise PipelineFailed(f"the run finished but wrote nothing under {root}")
    steps = [console.steps[name] for name in TASK_ORDER]
    for step in steps:  # the run's folder shows every task, the ones found done too
        link = run_dir / step.name
        if step.status == "cached" and step.folder is not None and not link.exists():
            link.symlink_to(os.path.relpath(step.folder, run_dir))
        step.folder = link if link.exists() else step.folder
    latest = out / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.relative_to(out))
    run = LocalRun(out, run_dir, steps, time.perf_counter() - started, copy_reports(run_dir))
    (run_dir / "run.json").write_text(json.dumps({
        "seconds": round(run.seconds, 3),
        "steps": [{"name": s.name, "status": s.status, "seconds": round(s.seconds, 3), "metrics": s.metrics,
                   "folder": str(s.folder) if s.folder else None} for s in steps]}, indent=1) + "\n")
    return run


def _newest_run(root: Path) -> Path | None:
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PIPELINE_NAME)),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def copy_reports(run_dir: Path) -> dict[str, Path]:
    """The steps' HTML artifacts as `<run>/reports/<task>.html` (KFP names them without a suffix,
    and a browser shows those as text), plus the Great Expectations Data Docs' index."""
    reports = {}
    folder = run_dir / "reports"
    folder.mkdir(exist_ok=True)
    for task, name in REPORTS.items():
        source = run_dir / task / name
        if source.is_file():
            target = folder / f"{task}.html"
            shutil.copyfile(source, target)
            reports[task] = target
    docs = run_dir / "validate" / "clean" / "data_docs" / "index.html"
    if docs.is_file():
        reports["data docs"] = docs
    return reports


def shown(path: str | os.PathLike) -> str:
    """`path` as a command line shows it: relative to the working folder when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def invocation() -> str:
    """How this process was started, for hints that work as printed: `distillery` when that is
    what PATH finds, `.venv/bin/distillery` when started by path, `python -m pipelines.cli` else."""
    import shlex
    import sys

    argv0 = Path(sys.argv[0])
    if argv0.name == "distillery":
        found = shutil.which("distillery")
        if found and Path(found).resolve() == argv0.resolve():
            return "distillery"
        return shlex.quote(shown(argv0))
    return f"{shlex.quote(shown(sys.executable))} -m pipelines.cli"


def registry_and_next(run: LocalRun, params: PipelineParams, preset: str | None) -> tuple[list[str], list[str]]:
    """(what the run's registry holds, the commands to try next), as the run's summary prints them."""
    import shlex

    from components.registry.errors import RegistryError
    from components.registry.registry import Registry

    cfg = params.registry
    where = shlex.quote(shown(cfg.root))
    me = invocation()
    flag = f" --preset {shlex.quote(preset)}" if preset else ""
    model = run.out / "latest" / "quantize" / "model" / "model"
    commands = []
    if model.is_dir():
        prompt = params.serve.check.prompts[0] if params.serve.check.prompts else "What is 12 - 5?"
        commands.append(f"{me} generate --checkpoint {shlex.quote(shown(model))} --prompt {shlex.quote(prompt)}")
    try:
        reg = Registry(cfg.root, cfg)
    except RegistryError:
        return [f"registry: none at {where} (the run did not reach promote)"], commands
    versions = reg.versions(cfg.name)
    staging, production = reg.current(cfg.name, "staging"), reg.current(cfg.name, "production")
    lines = [f"registry: {where}: {cfg.name} {', '.join(versions) or 'no versions'}; "
             f"staging {staging or '-'}, production {production or '-'}"]
    commands.append(f"{me} registry show --registry {where}")
    if staging:
        commands.append(f"{me} serve{flag} --registry {where} --stage staging "
                        f"--repository {shlex.quote(shown(run.out / 'triton'))}")
        if staging != production:
            commands.append(f"{me} promote {staging} --to production --registry {where}")
    return lines, commands
