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


def test_dvc_repro_runs_the_stages_and_then_is_up_to_date(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    for package in ("components", "pipelines"):
        shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["preset"] = "tiny"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], work, env)
    _run(dvc + ["init", "-q"], work, env)
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
    assert lock["stages"]["generate"]["params"]["params.yaml"]["preset"] == "tiny"
    assert sum(1 for _ in open(work / "data/sample/raw.jsonl")) == 400  # the tiny preset's rows

    again = _run(dvc + ["repro"], work, env)
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout.lower()
    assert "Running stage" not in again.stdout

    metrics = _run(dvc + ["metrics", "show", "--json"], work, env)
    shown = json.loads(metrics.stdout)
    assert any("data/validated/metrics.json" in json.dumps(v) for v in shown.values())

    # the local remote of the README: push, lose the workspace copies and the cache, pull back
    remote = tmp_path / "remote"
    _run(dvc + ["remote", "add", "-d", "local", str(remote)], work, env)
    _run(dvc + ["push"], work, env)
    kept = (work / "data/filtered/kept.jsonl").read_bytes()
    shutil.rmtree(work / ".dvc" / "cache")
    (work / "data/filtered/kept.jsonl").unlink()
    _run(dvc + ["pull"], work, env)
    assert (work / "data/filtered/kept.jsonl").read_bytes() == kept

    # a parameter change re-runs only what depends on it
    params["split"]["salt"] = "another"
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(dvc + ["repro"], work, env)
    assert "Running stage 'split'" in third.stdout
    assert "Running stage 'validate'" not in third.stdout
    assert "Running stage 'train_base'" in third.stdout  # its data changed
    assert "Running stage 'evaluate'" in third.stdout  # and so does everything after it

    # a reinforce parameter re-runs reinforce and what follows, not base
    params["reinforce"]["kl_coef"] = 0.1
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = _run(dvc + ["repro"], work, env)
    assert "Running stage 'train_reinforce'" in fourth.stdout and "Running stage 'train_finetune'" in fourth.stdout
    assert "Running stage 'train_base'" not in fourth.stdout
