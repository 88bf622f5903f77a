"""The stages after base through the CLI, on real DeepSpeed in subprocesses: reinforce (GRPO,
with growth), exact resume of a GRPO run, finetune with frozen layers, evaluate, generate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distillery_cli import ENV, REPO, cli, launcher, ok
from safetensors.torch import load_file

from components.data.config import GenerateConfig
from components.data.generate import generate
from components.data.load import write_jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A split of short problems and a tiny base model trained on it."""
    root = tmp_path_factory.mktemp("stages")
    rows, _ = generate(GenerateConfig(rows=160, noise=0.0, max_ops=1))
    split = root / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:120]])
    write_jsonl(split / "val.jsonl", rows[120:140])
    write_jsonl(split / "test.jsonl", rows[140:])
    ok(cli("train", "--stage", "base", "--data", str(split), "--out", str(root / "base")))
    return root


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_reinforce_with_growth_then_finetune_then_evaluate_and_generate(trained):
    root, split = trained, str(trained / "split")
    ok(cli("train", "--stage", "reinforce", "--init", str(root / "base/model"), "--data", split,
           "--out", str(root / "rl"), "--set", "reinforce.grow_layers=1", "--set", "reinforce.updates_per_batch=2"))
    rows = _metrics(root / "rl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["resampled"] for r in rows] == [True, False, True, False]  # updates_per_batch 2
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["format"] <= 1 and r["kl"] >= 0 and r["length"] > 0
        assert 0 <= r["flat_groups"] <= 1  # the share of groups whose rewards were all equal (no gradient)
    assert rows[0]["kl"] == 0.0  # the first update: policy == reference
    assert (root / "rl/rewards.png").stat().st_size > 0
    rl_cfg = json.loads((root / "rl/model/model.json").read_text())
    assert rl_cfg["n_layer"] == json.loads((root / "base/model/model.json").read_text())["n_layer"] + 1
    manifest = json.loads((root / "rl/manifest.json").read_text())
    assert manifest["step"] == "train.reinforce" and "final_reward" in manifest["metrics"]
    sel = json.loads((root / "rl/selection.json").read_text())  # no selection in the tiny preset: every prompt
    assert sel["samples"] == 0 and sel["kept"] == sel["prompts"] == len(sel["rows"]) > 0

    ok(cli("train", "--stage", "finetune", "--init", str(root / "rl/model"), "--data", split,
           "--out", str(root / "ft")))
    before, after = load_file(str(root / "rl/model/model.safetensors")), load_file(str(root / "ft/model/model.safetensors"))
    top = rl_cfg["n_layer"] - 1  # train_top_layers 1 in the tiny preset
    trained_names = {k for k in after if k.startswith((f"blocks.{top}.", "ln_f."))}
    for name in after:
        if name in trained_names:
            continue
        assert torch.equal(before[name], after[name]), f"{name}: frozen, yet changed"
    assert any(not torch.equal(before[k], after[k]) for k in trained_names)

    out = ok(cli("evaluate", "--checkpoint", f"base={root / 'base/model'}", "--checkpoint", f"reinforce={root / 'rl/model'}",
                 "--checkpoint", f"finetune={root / 'ft/model'}", "--data", split, "--out", str(root / "eval")))
    metrics = json.loads((root / "eval/metrics.json").read_text())
    for stage in ("base", "reinforce", "finetune"):
        assert 0 <= metrics[f"{stage}_accuracy"] <= 1 and metrics[f"{stage}_perplexity"] > 1
        assert 0 <= metrics[f"{stage}_pass1"] <= 1
    assert metrics["problems"] == 20
    assert "| finetune |" in (root / "eval/stages.md").read_text() and (root / "eval/stages.png").stat().st_size
    assert len((root / "eval/completions.jsonl").read_text().splitlines()) == 60
    assert "evaluate: base: accuracy" in out.stderr  # progress and step messages: stderr

    gen = ok(cli("generate", "--checkpoint", str(root / "ft/model"), "--prompt", "Ann has 3 apples.",
                 "--max-new-tokens", "20", "--samples", "2", "--temperature", "1.0"))
    first, second = gen.stdout.split("--- sample 2\n")
    assert first.startswith("--- sample 1\n") and 0 < len(second.rstrip("\n")) <= 20  # bytes: 1 token each


def test_a_grpo_run_resumed_from_a_checkpoint_ends_with_the_same_weights(trained):
    root, split = trained, str(trained / "split")
    args = ("train", "--stage", "reinforce", "--init", str(root / "base/model"), "--data", split,
            "--set", "reinforce.ref_update_every=2")
    ok(cli(*args, "--out", str(root / "straight")))
    ok(cli(*args, "--out", str(root / "resumed")))
    # forget the last checkpoint and the steps after the first: the run resumes from step 2
    shutil.rmtree(root / "resumed/checkpoints/step-00000004")
    (root / "resumed/checkpoints/latest").write_text("step-00000002\n")
    ok(cli(*args, "--out", str(root / "resumed")))
    a, b = load_file(str(root / "straight/model/model.safetensors")), load_file(str(root / "resumed/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per_s"))} for r in _metrics(root / "straight")]
    again = [{k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per_s"))} for r in _metrics(root / "resumed")]
    assert strip == again


def test_reinforce_selects_prompts_by_solve_rate_and_writes_the_bands(trained, tmp_path):
    root, split = trained, str(trained / "split")
    args = ("train", "--stage", "reinforce", "--init", str(root / "base/model"), "--data", split,
            "--set", "reinforce.select_samples=2", "--set", "reinforce.select_prompts=40")
    out = ok(cli(*args, "--out", str(tmp_path / "all"), "--set", "reinforce.select_min=0",
                 "--set", "reinforce.select_max=1"))
    sel = json.loads((tmp_path / "all/selection.json").read_text())
    assert sel["prompts"] == 40 == sel["kept"] == sum(sel["bands"].values()) == len(sel["rows"])
    assert all(r["rate"] in (0.0, 0.5, 1.0) and r["kept"] for r in sel["rows"])
    assert "solve rates in 2 samples" in out.stderr and f"{sel['bands']['never']} never" in out.stderr
    manifest = json.loads((tmp_path / "all/manifest.json").read_text())
    assert "selection" in manifest["outputs"] and manifest["metrics"]["selected_prompts"] == 40
    assert all("dropped" in r and "sample_rounds" in r for r in _metrics(tmp_path / "all") if r.get("resampled"))
    # a band no prompt can fall in (2 samples: rates 0, 0.5 or 1): one line, exit 1, nothing written
    none = cli(*args, "--out", str(tmp_path / "none"), "--set", "reinforce.select_min=0.6",
               "--set", "reinforce.select_max=0.9")
    assert none.returncode == 1 and "no training prompt has a solve rate within [0.6, 0.9]" in none.stderr
    assert "Traceback" not in none.stderr and not (tmp_path / "none").exists()


def test_stage_errors_name_what_is_wrong(trained, tmp_path):
    root, split = trained, str(trained / "split")
    missing = cli("train", "--stage", "reinforce", "--data", split, "--out", str(tmp_path / "x"))
    assert missing.returncode == 1 and "--init" in missing.stderr
    not_model = cli("train", "--stage", "finetune", "--init", split, "--data", split, "--out", str(tmp_path / "y"))
    assert not_model.returncode == 1 and "not a model folder" in not_model.stderr
    corrupt = tmp_path / "corrupt"
    shutil.copytree(root / "base/model", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x80\x04pickle?")
    bad = cli("generate", "--checkpoint", str(corrupt), "--prompt", "hi")
    assert bad.returncode == 1 and "model.safetensors" in bad.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_grpo_runs_on_two_processes_and_logs_their_mean(trained):
    """Each rank samples its own prompts; the step's reward statistics are all-reduced over gloo."""
    root, split = trained, str(trained / "split")
    cmd = [sys.executable, *launcher(2), "--module", "pipelines.cli",
           "train", "--stage", "reinforce", "--init", str(root / "base/model"), "--data", split,
           "--out", str(root / "rl2"), "--preset", "tiny", "--set", "reinforce.steps=2"]
    ok(subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=REPO))
    rows = _metrics(root / "rl2")
    assert [r["step"] for r in rows] == [1, 2]
    # Step 1 sampled from the base model on each rank: redo both ranks' draws here, one at a time
    from components.data.load import load_canonical
    from components.train.grpo import GRPO
    from components.model.folder import load_model
    from pipelines.params import load_params

    cfg = load_params(None, "tiny", {"reinforce": {"steps": 2}})[0].reinforce
    model, tok = load_model(root / "base/model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran (OMP_NUM_THREADS=1)
    per_rank = []
    try:
        for rank in (0, 1):
            grpo = GRPO(cfg, load_canonical(Path(split) / "train.jsonl"), tok, model, model.cfg.block_size)
            grpo.sample(model, 0, rank, world=1)
            per_rank.append(grpo.batch_stats)
    finally:
        torch.set_num_threads(threads)
    for key in ("reward", "accuracy", "format", "length"):
        assert rows[0][key] == pytest.approx((per_rank[0][key] + per_rank[1][key]) / 2), key
    assert any(per_rank[0][k] != per_rank[1][k] for k in ("reward", "length"))  # so rank 0 alone would differ
    from components.train.checkpoint import read_state
    latest = (root / "rl2/checkpoints/latest").read_text().strip()
    assert read_state(root / "rl2/checkpoints" / latest)["world_size"] == 2


def test_pass_at_1_and_k_sample_each_problem_k_times_and_near_zero_temperature_is_greedy(trained):
    from components.train.config import EvaluateConfig
    from components.train.evaluate import evaluate_model, problems
    from components.model.folder import load_model

    model, tok = load_model(trained / "base/model")
    rows = problems(trained / "split", EvaluateConfig(max_rows=12))
    cold, answers = evaluate_model(model, tok, rows, EvaluateConfig(samples=3, temperature=1e-6), batch=5)
    assert all(a["samples"] == [a["completion"]] * 3 for a in answers)  # each row's own samples, in order
    assert cold["pass1"] == cold["pass3"] == cold["accuracy"]  # every sample the greedy answer
    warm, answers = evaluate_model(model, tok, rows, EvaluateConfig(samples=3, temperature=1.0), batch=5)
    assert all(len(a["samples"]) == 3 for a in answers) and 0 <= warm["pass1"] <= warm["pass3"] <= 1
    assert any(len(set(a["samples"])) > 1 for a in answers)
    none, answers = evaluate_model(model, tok, rows, EvaluateConfig(samples=0), batch=5)
    assert "pass1" not in none and "pass3" not in none and "samples" not in answers[0]
    assert none["accuracy"] == cold["accuracy"]
