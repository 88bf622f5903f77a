"""dvc.yaml: `dvc repro` runs the data stages for real in a fresh git + DVC checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _declared(dvc_yaml: Path) -> set[str]:
    """Every path dvc.yaml declares as a stage's output, metric or plot."""
    paths = set()
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.add(next(iter(entry)) if isinstance(entry, dict) else entry)
    return paths


def test_dvc_repro_runs_the_stages_and_then_is_up_to_date(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    for package in ("components", "pipelines", "conf"):
        shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    # params.yaml is the Hydra composition of a preset, written by the command the README gives
    composed = _run([sys.executable, "-m", "pipelines.cli", "params", "--preset", "tiny", "--composed"], work, env)
    (work / "params.yaml").write_text(composed.stdout)
    assert (REPO / ".dvc" / "config").read_text().count("enabled = true") == 1  # the repository's Hydra switch
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], work, env)
    _run(dvc + ["init", "-q"], work, env)
    shutil.copy(REPO / ".dvc" / "config", work / ".dvc" / "config")
    _run(dvc + ["repro"], work, env)
    for out in ("data/sample/raw.jsonl", "data/validated/clean.jsonl", "data/filtered/kept.jsonl",
                "data/split/train.jsonl", "dvc.lock"):
        assert (work / out).is_file(), out
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"generate", "validate", "filter", "split", "train_base", "train_reinforce",
                                   "train_finetune", "evaluate", "distill", "quantize", "serve_export", "serve_check",
                                   "release"}
    promotion = json.loads((work / "data/release/promotion.json").read_text())
    assert promotion["version"] == "v0.0.1" and promotion["staging"] == "v0.0.1"  # the first model, gated on minimums
    assert json.loads((work / "data/serve/check.json").read_text())["passed"]
    for stage in ("base", "reinforce", "finetune"):
        assert (work / f"data/{stage}/model/model.safetensors").is_file()
    assert "finetune_accuracy" in json.loads((work / "data/evaluate/metrics.json").read_text())
    assert lock["stages"]["train_base"]["params"]["params.yaml"]["train"]["steps"] == 30  # tiny's value, as used
    assert sum(1 for _ in open(work / "data/sample/raw.jsonl")) == 400  # the tiny preset's rows

    # every file a stage wrote is declared in dvc.yaml or ignored: git sees nothing else
    declared = _declared(work / "dvc.yaml")
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], work, env).stdout.splitlines()
    stray = [line[3:] for line in status if line.startswith("??") and line[3:].startswith("data/")
             and not line.endswith(".gitignore") and not any(line[3:] == d or line[3:].startswith(d + "/")
                                                             for d in declared)]
    assert not stray, f"written by a stage but neither declared in dvc.yaml nor ignored: {stray}"

    again = _run(dvc + ["repro"], work, env)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout.lower()
    assert "Running stage" not in again.stdout

    metrics = _run(dvc + ["metrics", "show", "--json"], work, env)
    shown = json.loads(metrics.stdout)
    assert any("data/validated/metrics.json" in json.dumps(v) for v in shown.values())
    # the training curves are data that `dvc plots` reads, per step
    plots = json.loads(_run(dvc + ["plots", "show", "--json"], work, env).stdout)["data"]
    curve = [row for p in plots["training loss"] for row in p["content"]["data"]["values"]
             if row["filename"].endswith("base/plots/train.csv")]
    assert len(curve) == 30 and {"step", "loss", "lr"} <= set(curve[0])

    # the local remote of the README: push, lose the workspace copies and the cache, pull back
    remote = tmp_path / "remote"
    _run(dvc + ["remote", "add", "-d", "local", str(remote)], work, env)
    _run(dvc + ["push"], work, env)
    kept = (work / "data/filtered/kept.jsonl").read_bytes()
    shutil.rmtree(work / ".dvc" / "cache")
    (work / "data/filtered/kept.jsonl").unlink()
    _run(dvc + ["pull"], work, env)
    assert (work / "data/filtered/kept.jsonl").read_bytes() == kept

    # a parameter change re-runs the stage that reads it (--dry: what would run), and the stages
    # downstream of it through their data (the DAG's edges)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["split"]["salt"] = "another"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = _run(dvc + ["repro", "--dry"], work, env).stdout
    assert "Running stage 'split'" in dry and "Running stage 'validate'" not in dry
    params["split"]["salt"] = "distillery"
    params["reinforce"]["kl_coef"] = 0.1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = _run(dvc + ["repro", "--dry"], work, env).stdout
    assert "Running stage 'train_reinforce'" in dry
    assert "Running stage 'train_base'" not in dry and "Running stage 'split'" not in dry
    dot = _run(dvc + ["dag", "--dot"], work, env).stdout
    edges = {line.strip().rstrip(";").replace('"', "") for line in dot.splitlines()}
    for edge in ("split -> train_base", "train_base -> train_reinforce", "train_reinforce -> train_finetune",
                 "train_finetune -> evaluate", "train_finetune -> distill", "quantize -> serve_export"):
        assert edge in edges, edge

    # an experiment: Hydra composes params.yaml from conf/ with the -S values, the stage runs with
    # them, and what DVC shows is what ran
    (work / "params.yaml").write_text(composed.stdout)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "tiny run"], work, env)
    _run(dvc + ["exp", "run", "-S", "preset=tiny", "-S", "train.steps=12", "train_base"], work, env)
    assert yaml.safe_load((work / "params.yaml").read_text())["train"]["steps"] == 12
    assert json.loads((work / "data/base/metrics.json").read_text())["steps"] == 12  # used, not overridden
    assert len((work / "data/base/plots/train.csv").read_text().splitlines()) == 1 + 12
    diff = json.loads(_run(dvc + ["params", "diff", "--json"], work, env).stdout)["params.yaml"]
    assert {k: (v["old"], v["new"]) for k, v in diff.items()} == {"train.steps": (30, 12)}  # that one, no other
    shown = json.loads(_run(dvc + ["exp", "show", "--json"], work, env).stdout)
    steps = [rev["data"]["params"]["params.yaml"]["data"]["train"]["steps"]
             for base in shown for exp in base.get("experiments") or [] for rev in exp["revs"]]
    assert steps == [12]
