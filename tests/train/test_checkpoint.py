"""Checkpoints: exact resume of a DeepSpeed ZeRO engine from safetensors + JSON (real DeepSpeed
processes over gloo), atomic publication, pruning, and state trees without pickle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

from components.train import checkpoint
from distillery_cli import launcher

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ds_resume_script.py")


def _deepspeed(n: int, *args: str) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *launcher(n), str(SCRIPT), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("procs, stage", [(1, 1), (2, 2)])
def test_resume_is_exact_under_zero(tmp_path, procs, stage):
    _deepspeed(procs, str(tmp_path), str(stage))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resumed"] == result["straight"]  # every per-step loss, bit for bit
    assert result["state"] == {"step": 5, "extra": {"data_position": 40}}
    params = load_file(str(tmp_path / "params.safetensors"))
    names = [k.removeprefix("straight.") for k in params if k.startswith("straight.")]
    assert names and all(torch.equal(params[f"straight.{n}"], params[f"resumed.{n}"]) for n in names)
    saved = sorted(p.name for p in (tmp_path / "ckpt" / "step-00000005").iterdir())
    assert saved == ["hashes.json", "model.safetensors"] + \
        [f"optimizer-rank{r:05d}.safetensors" for r in range(procs)] + [f"state-rank{r:05d}.json" for r in range(procs)]
    assert checkpoint.damage(tmp_path / "ckpt" / "step-00000005") is None


def _plain(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


class Plain:
    """A module and optimizer with the attribute names of a DeepSpeed engine."""

    def __init__(self):
        self.module, self.optimizer = _plain()
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.global_steps = 0

    def step(self):
        loss = self.module(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.lr_scheduler.step()
        self.global_steps += 1
        return loss.item()


def test_plain_torch_resume_is_exact_and_latest_moves(tmp_path):
    straight = Plain()
    a = [straight.step() for _ in range(8)]
    first = Plain()
    b = [first.step() for _ in range(3)]
    checkpoint.save(tmp_path, 3, first)
    b.append(first.step())
    checkpoint.save(tmp_path, 4, first, extra={"epoch": 1})
    resumed = Plain()
    assert checkpoint.load(checkpoint.latest(tmp_path), resumed) == {"step": 4, "extra": {"epoch": 1}}
    assert resumed.global_steps == 4
    b += [resumed.step() for _ in range(4)]
    assert a == b
    assert torch.equal(straight.module.weight, resumed.module.weight)


def test_keep_prunes_old_checkpoints(tmp_path):
    engine = Plain()
    for step in range(1, 6):
        engine.step()
        checkpoint.save(tmp_path, step, engine, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"


def test_an_interrupted_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    engine = Plain()
    engine.step()
    checkpoint.save(tmp_path, 1, engine)
    # what a process killed while writing step 2 leaves: a temporary folder, half its files
    partial = tmp_path / ".step-00000002.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    assert checkpoint.load(checkpoint.latest(tmp_path), Plain())["step"] == 1
    engine.step()
    checkpoint.save(tmp_path, 2, engine)  # the next save replaces the leftover
    assert checkpoint.latest(tmp_path).name == "step-00000002" and not partial.exists()


def test_a_stale_latest_pointer_falls_back_to_the_newest_complete(tmp_path):
    engine = Plain()
    checkpoint.save(tmp_path, 1, engine)
    (tmp_path / "latest").write_text("step-00000009\n")
    assert checkpoint.latest(tmp_path).name == "step-00000001"
    assert checkpoint.latest(tmp_path / "nothing") is None


def test_state_files_hold_no_pickle(tmp_path):
    engine = Plain()
    engine.step()
    path = checkpoint.save(tmp_path, 1, engine)
    state = json.loads((path / "state-rank00000.json").read_text())  # plain JSON
    assert state["scheduler"]["last_epoch"] == 1
    for f in path.glob("*.safetensors"):
        assert not f.read_bytes().startswith(b"\x80")  # a pickle stream starts with PROTO 0x80
        load_file(str(f))


def test_flatten_round_trips_nested_state():
    tensors: dict[str, torch.Tensor] = {}
    state = {"a": [torch.ones(2), (1, "x", None)], 3: {"b": torch.zeros(1, dtype=torch.bfloat16), "c": 2.5}}
    tree = checkpoint.flatten(state, "s", tensors)
    json.dumps(tree)
    back = checkpoint.unflatten(json.loads(json.dumps(tree)), tensors, state)
    assert back["a"][1] == (1, "x", None) and back[3]["c"] == 2.5
    assert torch.equal(back["a"][0], torch.ones(2)) and back[3]["b"].dtype == torch.bfloat16


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def warning(self, message: str) -> None:
        self.lines.append(message)


def _three(root: Path) -> Plain:
    engine = Plain()
    for step in (1, 2, 3):
        engine.step()
        checkpoint.save(root, step, engine)
    return engine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=st.sampled_from(["model.safetensors", "optimizer-rank00000.safetensors", "state-rank00000.json",
                             "hashes.json"]),
       how=st.sampled_from(["truncate", "flip", "delete", "empty", "append"]), where=st.floats(0, 1),
       newest_two=st.booleans())
def test_a_damaged_checkpoint_is_reported_moved_aside_and_the_newest_intact_one_resumes(
        tmp_path_factory, file, how, where, newest_two):
    root = tmp_path_factory.mktemp("ckpt")
    _three(root)
    damaged = ["step-00000003", "step-00000002"] if newest_two else ["step-00000003"]
    for name in damaged:
        target = root / name / file
        data = target.read_bytes()
        at = min(int(where * len(data)), len(data) - 1)
        if how == "truncate":
            target.write_bytes(data[:at])
        elif how == "flip":
            target.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
        elif how == "delete":
            target.unlink()
        elif how == "empty":
            target.write_bytes(b"")
        else:
            target.write_bytes(data + b"\0")
        if how == "append" and file == "hashes.json":  # trailing junk after the JSON: still damaged
            assert checkpoint.damage(root / name) is not None
    lines = Lines()
    good = checkpoint.resume_point(root, lines)
    intact = "step-00000001" if newest_two else "step-00000002"
    assert good == root / intact
    assert (root / "latest").read_text().strip() == intact
    assert [p.name for p in checkpoint.checkpoints(root)] == sorted({"step-00000001", "step-00000002"} - set(damaged))
    assert sorted(p.name for p in root.glob(".damaged-*")) == [f".damaged-{n}" for n in sorted(damaged)]
    assert len(lines.lines) == len(damaged) and all("\n" not in line for line in lines.lines)
    assert all(f"checkpoint {root / n}: damaged" in line for n, line in zip(damaged, lines.lines))
    assert checkpoint.load(good, Plain())["step"] == int(intact[-1])


def test_no_intact_checkpoint_starts_afresh_and_an_intact_one_is_left_alone(tmp_path):
    _three(tmp_path)
    assert checkpoint.resume_point(tmp_path) == tmp_path / "step-00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001", "step-00000002", "step-00000003"]
    for path in checkpoint.checkpoints(tmp_path):
        (path / "hashes.json").unlink()
    lines = Lines()
    assert checkpoint.resume_point(tmp_path, lines) is None
    assert [line.split(": damaged, ")[1].split(";")[0] for line in lines.lines] == \
        ["no hashes.json (written before checkpoints recorded their hashes, or damaged)"] * 3
    assert checkpoint.resume_point(tmp_path / "nothing") is None


def test_a_checkpoint_published_before_latest_moved_is_taken(tmp_path):
    _three(tmp_path)
    (tmp_path / "latest").write_text("step-00000002\n")  # killed between the rename and the pointer
    assert checkpoint.resume_point(tmp_path) == tmp_path / "step-00000003"
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"


def test_hashes_naming_a_path_outside_the_checkpoint_are_damage(tmp_path):
    _three(tmp_path)
    path = tmp_path / "step-00000003"
    (path / "hashes.json").write_text(json.dumps({"sha256": {"../step-00000002/model.safetensors": "0" * 64}}))
    assert "outside the checkpoint" in checkpoint.damage(path)
