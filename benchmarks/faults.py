"""Fault injection: a training run killed (SIGKILL) at random moments, resumed, compared.

    .venv/bin/python benchmarks/faults.py                       # 20 kills, the tiny base stage (~8 min)
    .venv/bin/python benchmarks/faults.py --kills 4 --json faults.json

One straight run of `distillery train --stage base` (tiny preset, `--steps` steps, a checkpoint
every `--every`) gives the reference weights. Then, `--kills` times, the same command starts on a
fresh output folder and is killed with SIGKILL at a moment drawn from three kinds:

- `step`: after a random number of logged steps, plus 0-300 ms (anywhere in the next step);
- `write`: while a checkpoint is being written (the moment its temporary folder appears, plus
  0-20 ms: inside the writes of the weights, the optimizer state, the hashes or the rename);
- `start`: during start-up, before the first step (imports, DeepSpeed's initialisation).

Each killed run is resumed by running the same command again, to the end. Per kill the table
says what the kill left (steps logged, whether a checkpoint's temporary folder was left behind,
i.e. the kill landed mid-write), the step the resume started from, the steps lost (logged before
the kill but done again), whether the resume succeeded and whether its final weights are
bit-identical to the straight run's. Goal (issue 18): every run resumed, every one identical,
at most one checkpoint interval lost each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
       "GX_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
RESUMED = re.compile(r"resuming from \S+ \(step (\d+) of")


def make_split(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from components.data.config import GenerateConfig
    from components.data.generate import generate
    from components.data.load import write_jsonl

    rows, _ = generate(GenerateConfig(rows=240, noise=0.0))
    folder.mkdir(parents=True)
    write_jsonl(folder / "train.jsonl", [{**r, "weight": 1.0} for r in rows[:200]])
    write_jsonl(folder / "val.jsonl", rows[200:])
    return folder


def command(data: Path, out: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--stage", "base", "--data", str(data), "--out", str(out),
            "--preset", "tiny", "--set", "tokenizer={kind: bpe, vocab_size: 300}", "--set", f"train.steps={steps}",
            "--set", f"train.checkpoint_every={every}", "--set", f"train.eval_every={every}",
            "--set", "train.keep_checkpoints=2"]


def logged(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return 0


def writing(out: Path) -> bool:
    try:
        return any(p.name.startswith(".step-") for p in (out / "checkpoints").iterdir())
    except OSError:
        return False


def kill_at(cmd: list[str], out: Path, kind: str, rng: random.Random, steps: int, every: int) -> dict:
    """Start `cmd`, kill it at a moment of `kind`; what it left behind."""
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = rng.randint(1, steps - 2)
    checkpoint_no = rng.randint(1, steps // every - 1)  # never the last one: the run would end there
    delay = {"step": rng.uniform(0, 0.3), "write": rng.uniform(0, 0.02), "start": 0.0}[kind]
    start_after = rng.uniform(0.5, 4.0)
    t0, seen_writes, was_writing = time.perf_counter(), 0, False
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if kind == "start" and now >= start_after and logged(out) == 0:
            break
        if kind == "step" and logged(out) >= target:
            break
        if kind == "write":
            w = writing(out)
            if w and not was_writing:
                seen_writes += 1
                if seen_writes == checkpoint_no:
                    break
            was_writing = w
        time.sleep(0.001)
    if proc.poll() is not None:
        return {"kind": kind, "killed": False}
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"kind": kind, "killed": True, "logged": logged(out), "mid_write": writing(out)}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=900)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--every", type=int, default=4, help="checkpoint interval (steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every kill's record here")
    ap.add_argument("--work", help="keep the runs in this folder (default: a temporary one, removed)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="distillery-faults-"))
    try:
        data = make_split(work / "split")
        t0 = time.perf_counter()
        straight = run(command(data, work / "straight", args.steps, args.every))
        if straight.returncode != 0:
            print(straight.stderr[-3000:], file=sys.stderr)
            return 1
        wall = time.perf_counter() - t0
        reference = (work / "straight" / "model" / "model.safetensors").read_bytes()
        print(f"straight run: {args.steps} steps, a checkpoint every {args.every}, {wall:.1f} s")
        kinds = (["write", "step", "start"] * args.kills)[:args.kills]
        rng.shuffle(kinds)
        records = []
        for i, kind in enumerate(kinds, 1):
            out = work / f"kill-{i:02d}"
            cmd = command(data, out, args.steps, args.every)
            record = {"kill": i, **kill_at(cmd, out, kind, rng, args.steps, args.every)}
            resumed = run(cmd)
            found = RESUMED.search(resumed.stderr + resumed.stdout)
            record["resumed_ok"] = resumed.returncode == 0
            record["resumed_from"] = int(found.group(1)) if found else 0
            record["lost"] = max(0, record.get("logged", 0) - record["resumed_from"])
            model = out / "model" / "model.safetensors"
            record["identical"] = model.is_file() and model.read_bytes() == reference
            if not record["resumed_ok"]:
                record["error"] = (resumed.stderr.strip().splitlines() or [""])[-1][:200]
            records.append(record)
            print(f"kill {i:2d} {kind:5s}: {'logged ' + str(record.get('logged')) + ' steps' if record['killed'] else 'ended first'}"
                  f"{', mid-write' if record.get('mid_write') else ''}; resumed from {record['resumed_from']}, "
                  f"lost {record['lost']}, {'identical' if record['identical'] else 'DIFFERENT'}"
                  f"{'' if record['resumed_ok'] else ', RESUME FAILED: ' + record['error']}", flush=True)
            if not args.work:
                shutil.rmtree(out, ignore_errors=True)
        killed = [r for r in records if r["killed"]]
        print()
        print("| kind | kills | mid-write | resumed | identical | steps lost (max) |")
        print("|---|---|---|---|---|---|")
        for kind in ("write", "step", "start", "all"):
            rs = [r for r in killed if kind == "all" or r["kind"] == kind]
            if rs:
                print(f"| {kind} | {len(rs)} | {sum(bool(r['mid_write']) for r in rs)} | "
                      f"{sum(r['resumed_ok'] for r in rs)} | {sum(r['identical'] for r in rs)} | "
                      f"{max(r['lost'] for r in rs)} |")
        goal = killed and all(r["resumed_ok"] and r["identical"] and r["lost"] <= args.every for r in killed)
        print(f"\ngoal (all resumed, all identical, at most {args.every} steps lost each): "
              f"{'met' if goal else 'NOT met'} over {len(killed)} kills"
              f"{f' ({len(records) - len(killed)} runs ended before their moment)' if len(killed) < len(records) else ''}")
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
        return 0 if goal else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
