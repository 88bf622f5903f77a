"""The staged chain, measured: does the reinforcement stage beat the base checkpoint, by more
than seed-to-seed spread? And where does a GRPO step spend its time?

    .venv/bin/python benchmarks/stages.py                 # 3 seeds, the small preset (about 20 min on 2 cores)
    .venv/bin/python benchmarks/stages.py --seeds 0 1 --reinforce-steps 40   # shorter

For each seed: the small preset's data steps once (shared), then base -> reinforce -> finetune
with that seed for training and sampling, then `evaluate` on the held-out test problems.
Prints per seed and as mean +- spread (max - min) over seeds: held-out accuracy (greedy),
pass@1 (sampled, as DeepSeek-R1 reports it), format rate, perplexity of reference responses,
and the GRPO step time split into generation, scoring and update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: distillery {' '.join(args)}\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--reinforce-steps", type=int, default=0, help="override reinforce.steps (0: the preset's)")
    parser.add_argument("--keep", help="keep the runs in this folder instead of a temporary one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override for every command, e.g. --set train.steps=1500")
    args = parser.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="distillery-stages-"))
    root.mkdir(parents=True, exist_ok=True)
    p = ("--preset", args.preset, *(x for kv in args.set for x in ("--set", kv)))
    cli("data", "generate", "--out", str(root / "raw.jsonl"), *p)
    cli("validate", str(root / "raw.jsonl"), "--out", str(root / "validated"), *p)
    cli("filter", str(root / "validated/clean.jsonl"), "--out", str(root / "filtered"), *p)
    cli("split", str(root / "filtered/kept.jsonl"), "--out", str(root / "split"), *p)
    results, timing = {}, {}
    for seed in args.seeds:
        s = root / f"seed{seed}"
        over = ["--set", f"train.seed={seed}"]
        cli("train", "--stage", "base", "--data", str(root / "split"), "--out", str(s / "base"), *p, *over)
        rl_over = ["--set", f"reinforce.seed={seed}"]
        if args.reinforce_steps:
            rl_over += ["--set", f"reinforce.steps={args.reinforce_steps}"]
        cli("train", "--stage", "reinforce", "--init", str(s / "base/model"), "--data", str(root / "split"),
            "--out", str(s / "reinforce"), *p, *rl_over)
        cli("train", "--stage", "finetune", "--init", str(s / "reinforce/model"), "--data", str(root / "split"),
            "--out", str(s / "finetune"), *p, "--set", f"finetune.seed={seed}")
        cli("evaluate", *(f"--checkpoint={n}={s / n / 'model'}" for n in ("base", "reinforce", "finetune")),
            "--data", str(root / "split"), "--out", str(s / "evaluate"), *p)
        results[seed] = json.loads((s / "evaluate/metrics.json").read_text())
        rows = [json.loads(line) for line in (s / "reinforce/metrics.jsonl").read_text().splitlines()]
        sampled = [r for r in rows if r.get("resampled")]
        timing[seed] = {k: statistics.mean(r[k] for r in sampled) for k in ("time_generate", "time_score")}
        timing[seed]["time_update"] = statistics.mean(r["time_update"] for r in rows)
        timing[seed]["updates_per_batch"] = len(rows) / len(sampled)
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in results[seed].items() if k != "problems"),
              flush=True)

    problems = next(iter(results.values()))["problems"]
    print(f"\nHeld-out test problems: {problems}; seeds {args.seeds}; preset {args.preset} "
          f"{' '.join(args.set)}\n")
    has_pass1 = all("base_pass1" in r for r in results.values())
    print("stage | accuracy (greedy) per seed | mean (spread) | pass@1 (sampled) per seed | mean (spread) "
          "| format mean | perplexity mean")
    print("--- | --- | --- | --- | --- | --- | ---")
    for stage in ("base", "reinforce", "finetune"):
        cells = []
        for measure in ("accuracy", "pass1"):
            if measure == "pass1" and not has_pass1:
                cells += ["-", "-"]
                continue
            v = [results[s][f"{stage}_{measure}"] for s in args.seeds]
            cells += [", ".join(f"{a:.3f}" for a in v), f"{statistics.mean(v):.3f} ({max(v) - min(v):.3f})"]
        fmt = [results[s][f"{stage}_format"] for s in args.seeds]
        ppl = [results[s][f"{stage}_perplexity"] for s in args.seeds]
        print(f"{stage} | {' | '.join(cells)} | {statistics.mean(fmt):.3f} | {statistics.mean(ppl):.3f}")
    print()
    for measure in ("accuracy", "pass1") if has_pass1 else ("accuracy",):
        gains = [results[s][f"reinforce_{measure}"] - results[s][f"base_{measure}"] for s in args.seeds]
        spread = max(max(results[s][f"{st}_{measure}"] for s in args.seeds)
                     - min(results[s][f"{st}_{measure}"] for s in args.seeds) for st in ("base", "reinforce"))
        print(f"reinforce - base {measure} per seed: {', '.join(f'{g:+.3f}' for g in gains)}; "
              f"mean {statistics.mean(gains):+.3f}; largest seed-to-seed spread of either stage {spread:.3f}; "
              f"{'gain exceeds the spread' if min(gains) > spread else 'gain does NOT exceed the spread'}")

    print("\nGRPO step time (seconds, mean per step; generation and scoring once per sampled batch)\n")
    print("seed | generate | score | update (per optimizer step) | share of generation")
    print("--- | --- | --- | --- | ---")
    for seed, t in timing.items():
        per_batch = t["time_generate"] + t["time_score"] + t["updates_per_batch"] * t["time_update"]
        print(f"{seed} | {t['time_generate']:.3f} | {t['time_score']:.4f} | {t['time_update']:.3f} | "
              f"{t['time_generate'] / per_batch:.0%}")
    print(f"\nruns kept in {root}" if args.keep else "")


if __name__ == "__main__":
    main()
