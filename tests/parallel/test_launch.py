"""components/train/launch.py: the KFP base step's own multi-process launch (torchrun on the
pod's GPUs; here 2 CPU processes over gloo) runs the 3D path and returns the summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from components.data.config import GenerateConfig
from components.data.generate import generate
from components.data.load import write_jsonl
from distillery_cli import ENV, REPO


def test_the_base_step_trains_pipelined_over_two_processes(tmp_path):
    rows, _ = generate(GenerateConfig(rows=80, noise=0.0))
    data = tmp_path / "split"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:70]])
    write_jsonl(data / "val.jsonl", rows[70:])
    code = (
        "import json, sys\n"
        "from components.model import ModelConfig\n"
        "from components.train import launch\n"
        "from components.train.config import TokenizerConfig, TrainConfig\n"
        "m = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, kernels='torch')\n"
        "t = TrainConfig(steps=3, micro_batch=2, warmup_steps=1, checkpoint_every=3, eval_every=0,\n"
        "                precision='fp32', pipeline_parallel=2, curriculum_start=1.0)\n"
        "s = launch.run_base(m, t, TokenizerConfig(kind='byte'), sys.argv[1], sys.argv[2], launch.processes())\n"
        "print('SUMMARY', json.dumps(s))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), str(data)],
                          env={**ENV, "DISTILLERY_PROCESSES": "2"}, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1])
    assert summary["steps"] == 3
    state = json.loads((tmp_path / "out/checkpoints/step-00000003/state.json").read_text())
    assert state["topology"] == {"pp": 2, "tp": 1, "dp": 1}  # two processes, pipelined
    assert (tmp_path / "out/model/model.safetensors").is_file()


def test_a_bad_process_count_is_refused_by_name(monkeypatch):
    from components.config import ConfigError
    from components.train import launch

    monkeypatch.setenv("DISTILLERY_PROCESSES", "two")
    with pytest.raises(ConfigError, match=r"\$DISTILLERY_PROCESSES: 'two'"):
        launch.processes()
