"""Does reinforcement beat its starting checkpoint? A controlled comparison, 3 seeds, one run.

    .venv/bin/python benchmarks/stages.py                      # 3 seeds, the small preset (75 min on 2 cores)
    .venv/bin/python benchmarks/stages.py --seeds 0 --heldout 300 --set reinforce.steps=20   # a quick look
    # an imported model on GSM8K (a GPU run: README "Your own model" makes the model and the split)
    .venv/bin/python benchmarks/stages.py --base-model models/smollm2 --data data/gsm8k/split --heldout 1319 \
        --set reinforce.lora_rank=16 --set finetune.lora_rank=16 --set reinforce.max_new_tokens=256 \
        --set reinforce.precision=bf16 --set evaluate.max_new_tokens=256

The small preset's data steps run once (generate, validate, filter, split). For each seed, with
that seed for training and sampling:
- base: the base stage;
- reinforce: GRPO from the base, as params say (the recipe the pipeline runs);
- random reward: the same GRPO, the accuracy reward replaced by a fair coin (reinforce.reward=random):
  whatever it gains is not the verifier's doing;
- continued SFT: supervised training from the base on the same prompts (the ones the GRPO run
  selected, with their reference solutions), as many optimizer steps as GRPO took, every block
  trained, at the fine-tune stage's learning rate: whatever it gains is just more training.
All four are evaluated on one held-out set of `--heldout` problems generated for it whose operand
combinations (the story's numbers, in order) never occur in the training split, so answering
them takes arithmetic, not recall: greedy accuracy, pass@1 and pass@k (k = evaluate.samples,
sampled at evaluate.temperature). GRPO is compared with each other arm problem by problem on greedy
answers: an exact McNemar test (components/train/evaluate.py). The goal it prints: GRPO beats the
base by at least 5 points of greedy accuracy with p < 0.01 on every seed, and beats both controls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
ARMS = ("base", "reinforce", "random_reward", "continued_sft")
GOAL_GAIN, GOAL_P = 0.05, 0.01


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: distillery {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


MARK = re.compile(r"<<(-?\d+)([-+*/])(-?\d+)=(-?\d+)>>")


def first_error(completion: str, reference: str, facts: set) -> str:
    """Where a wrong worked answer first goes wrong, against the reference's steps: `misread`
    (a step's operands or operation are not the story's: a number copied wrong, a previous result
    not carried, or another problem's steps recalled), `arithmetic, seen fact` / `unseen fact`
    (right operands, wrong result; the fact `a op b` does or does not occur in the training
    solutions), or `answer line` (every step right, the final line not)."""
    want, got = MARK.findall(reference), MARK.findall(completion)
    for i, (a, op, b, value) in enumerate(got):
        if i >= len(want) or (a, op, b) != want[i][:3]:
            return "misread"
        if value != want[i][3]:
            return f"arithmetic, {'seen' if (int(a), op, int(b)) in facts else 'unseen'} fact"
    return "misread" if len(got) < len(want) else "answer line"


def main() -> None:
    from components.data.generate import unseen_problems
    from components.train.evaluate import mcnemar

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--heldout", type=int, default=1000, help="held-out problems with unseen operands")
    parser.add_argument("--base-model", help="a model folder (distillery model import) as the base: no base "
                        "stage, the same base for every seed; needs --data")
    parser.add_argument("--data", help="with --base-model: a split folder (train.jsonl, val.jsonl, test.jsonl); "
                        "the held-out set is the first --heldout rows of its test.jsonl")
    parser.add_argument("--keep", help="keep the runs in this folder instead of a temporary one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override for every command, e.g. --set reinforce.steps=40")
    args = parser.parse_args()
    t_start = time.monotonic()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="distillery-stages-"))
    root.mkdir(parents=True, exist_ok=True)
    p = ("--preset", args.preset, *(x for kv in args.set for x in ("--set", kv)))
    params = yaml.safe_load(cli("params", *p))
    gen, rl = params["generate"], params["reinforce"]

    if args.base_model:
        if not args.data:
            parser.error("--base-model needs --data (a split folder)")
        split = Path(args.data)
        train_rows = jsonl(split / "train.jsonl")
        held = jsonl(split / "test.jsonl")[:args.heldout]
        print(f"data: {len(train_rows)} training rows; {len(held)} held-out problems from {split / 'test.jsonl'}",
              flush=True)
    else:
        split = root / "split"
        cli("data", "generate", "--out", str(root / "raw.jsonl"), *p)
        cli("validate", str(root / "raw.jsonl"), "--out", str(root / "validated"), *p)
        cli("filter", str(root / "validated/clean.jsonl"), "--out", str(root / "filtered"), *p)
        cli("split", str(root / "filtered/kept.jsonl"), "--out", str(split), *p)
        train_rows = jsonl(split / "train.jsonl")
        held = unseen_problems(args.heldout, [r.get("prompt") or "" for r in train_rows], 1_000_003,
                               gen["max_ops"], gen["max_number"])
        print(f"data: {len(train_rows)} training rows; {len(held)} held-out problems whose operand combinations "
              f"never occur in them", flush=True)
    write_jsonl(root / "heldout.jsonl", held)
    facts = {(int(a), op, int(b)) for r in train_rows for a, op, b, _ in MARK.findall(r.get("response") or "")}
    reference = {r["id"]: r["response"] for r in held}
    results, correct, diag, errors = {}, {}, {}, {}
    for seed in args.seeds:
        s = root / f"seed{seed}"
        t0 = time.monotonic()
        base = Path(args.base_model) if args.base_model else s / "base/model"
        if not args.base_model:
            cli("train", "--stage", "base", "--data", str(split), "--out", str(s / "base"), *p,
                "--set", f"train.seed={seed}")
        rl_set = ("--set", f"reinforce.seed={seed}")
        cli("train", "--stage", "reinforce", "--init", str(base), "--data", str(split),
            "--out", str(s / "reinforce"), *p, *rl_set)
        # the controls' data: the prompts GRPO trained on (its selection.json), the same val rows
        same = s / "selected_split"
        same.mkdir(parents=True, exist_ok=True)
        selection = s / "reinforce/selection.json"
        kept = {r["id"] for r in json.loads(selection.read_text())["rows"] if r["kept"]}
        write_jsonl(same / "train.jsonl", [r for r in train_rows if r.get("id") in kept])
        (same / "val.jsonl").write_text((split / "val.jsonl").read_text())
        cli("train", "--stage", "reinforce", "--init", str(base), "--data", str(same),
            "--out", str(s / "random_reward"), *p, *rl_set, "--set", "reinforce.reward=random",
            "--set", "reinforce.select_samples=0")  # the same prompts, selected already
        cli("train", "--stage", "finetune", "--init", str(base), "--data", str(same),
            "--out", str(s / "continued_sft"), *p, "--set", f"finetune.seed={seed}",
            "--set", f"finetune.steps={rl['steps']}", "--set", f"finetune.micro_batch={rl['prompts_per_step']}",
            "--set", "finetune.train_top_layers=0", "--set", f"finetune.checkpoint_every={rl['steps']}",
            "--set", f"finetune.eval_every={rl['steps']}", "--set", f"finetune.warmup_steps={min(10, rl['steps'] - 1)}")
        cli("evaluate", *(f"--checkpoint={a}={base if a == 'base' else s / a / 'model'}" for a in ARMS),
            "--data", str(root / "heldout.jsonl"), "--out", str(s / "evaluate"), *p, "--set", "evaluate.max_rows=0")
        results[seed] = json.loads((s / "evaluate/metrics.json").read_text())
        for c in jsonl(s / "evaluate/completions.jsonl"):
            correct.setdefault(seed, {}).setdefault(c["stage"], []).append(bool(c["correct"]))
            if not c["correct"] and not args.base_model:  # the anatomy of errors reads the synthetic steps
                kind = first_error(c["completion"], reference[c["id"]], facts)
                errors.setdefault(c["stage"], Counter())[kind] += 1
        rows = jsonl(s / "reinforce/metrics.jsonl")
        sampled = [r for r in rows if r.get("resampled")]
        sel = json.loads(selection.read_text())
        sel = sel if sel["samples"] else None
        diag[seed] = {"selection": sel, "flat": statistics.mean(r["flat_groups"] for r in sampled),
                      "dropped": statistics.mean(r.get("dropped", 0.0) for r in sampled),
                      "generate": statistics.mean(r["time_generate"] for r in sampled),
                      "update": statistics.mean(r["time_update"] for r in rows)}
        print(f"seed {seed} ({(time.monotonic() - t0) / 60:.1f} min): " + ", ".join(
            f"{a} {results[seed][f'{a}_accuracy']:.3f}" for a in ARMS), flush=True)

    first = results[args.seeds[0]]
    k = next((key[len("base_pass"):] for key in first if key.startswith("base_pass") and key != "base_pass1"), None)
    what = f"from {args.data}" if args.base_model else "with unseen operand combinations"
    print(f"\nHeld-out problems {what}: {len(held)}; seeds {args.seeds}; preset "
          f"{args.preset} {' '.join(args.set)}; GRPO {rl['steps']} steps x {rl['prompts_per_step']} prompts x "
          f"{rl['group_size']} samples\n")
    measures = ["accuracy", "pass1", *([f"pass{k}"] if k else [])]
    names = {"accuracy": "greedy", "pass1": "pass@1", **({f"pass{k}": f"pass@{k}"} if k else {})}
    print("arm | " + " | ".join(f"{names[m]} per seed | mean" for m in measures))
    print("---|" + "---|---|" * len(measures))
    for arm in ARMS:
        cells = []
        for m in measures:
            v = [results[s].get(f"{arm}_{m}", float("nan")) for s in args.seeds]
            cells += [" / ".join(f"{x:.3f}" for x in v), f"{statistics.mean(v):.3f}"]
        print(f"{arm} | " + " | ".join(cells))

    print("\nGRPO (reinforce) against each arm, greedy answers, paired by problem (exact McNemar)\n")
    print("seed | against | reinforce - arm | only arm right | only reinforce right | p")
    print("---|---|---|---|---|---")
    verdict = {}
    for seed in args.seeds:
        c = correct[seed]
        for arm in ("base", "random_reward", "continued_sft"):
            only_arm, only_rl, pval = mcnemar(c[arm], c["reinforce"])
            gain = results[seed]["reinforce_accuracy"] - results[seed][f"{arm}_accuracy"]
            verdict[seed, arm] = (gain, pval)
            print(f"{seed} | {arm} | {gain:+.3f} | {only_arm} | {only_rl} | {pval:.2g}")
    met_base = all(verdict[s, "base"][0] >= GOAL_GAIN and verdict[s, "base"][1] < GOAL_P for s in args.seeds)
    met_controls = all(verdict[s, a][0] > 0 for s in args.seeds for a in ("random_reward", "continued_sft"))
    print(f"\ngoal: +{GOAL_GAIN:.2f} greedy over the base with p < {GOAL_P} on every seed: "
          f"{'MET' if met_base else 'NOT MET'}; above both controls on every seed: "
          f"{'MET' if met_controls else 'NOT MET'}")

    if not args.base_model:  # the anatomy of errors reads the synthetic problems' steps
        kinds = ("misread", "arithmetic, seen fact", "arithmetic, unseen fact", "answer line")
        print("\nWhere wrong greedy answers first go wrong, summed over seeds (misread: a step's operands or "
              "operation are not the story's)\n")
        print("arm | " + " | ".join(kinds))
        print("---|" + "---|" * len(kinds))
        for arm in ARMS:
            print(f"{arm} | " + " | ".join(str(errors.get(arm, Counter())[k]) for k in kinds))

    print("\nGRPO diagnostics per seed (selection before the stage; per sampled batch)\n")
    print("seed | prompts never / sometimes / always solved | trained on | flat groups | dropped | "
          "generate s | update s")
    print("---|---|---|---|---|---|---")
    for seed, d in diag.items():
        sel = d["selection"]
        bands = (f"{sel['bands']['never']} / {sel['bands']['sometimes']} / {sel['bands']['always']}"
                 if sel else "- (no selection)")
        print(f"{seed} | {bands} | {sel['kept'] if sel else 'all'} | {d['flat']:.2f} | {d['dropped']:.2f} | "
              f"{d['generate']:.2f} | {d['update']:.2f}")
    print(f"\n{(time.monotonic() - t_start) / 60:.0f} min" + (f"; runs kept in {root}" if args.keep else ""))


if __name__ == "__main__":
    main()
