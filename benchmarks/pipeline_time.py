"""Where `distillery run` spends its time: each step of the tiny and small presets, and the share
spent outside the steps' own work (process start-up and imports, kfp.local's orchestration).

    .venv/bin/python benchmarks/pipeline_time.py                  # tiny then small, fresh runs (~10 min)
    .venv/bin/python benchmarks/pipeline_time.py --presets tiny   # one preset

Each preset runs as a user runs it (`distillery run --preset P --out <fresh folder>`, a
subprocess), with PYTHONPROFILEIMPORTTIME=1 so that every step's process writes its import
times into its log (`<out>/logs/<task>.log`, where the run's console files what a step prints).
Per step: its wall time as the console measured it, the time its process spent importing
(the sum of the top-level imports' cumulative times), and the rest, its own work. The run's
overhead is the imports of every step plus the time outside any step (the CLI's own start-up,
building the DAG, kfp.local between tasks, the summary). Goals (issue 15): the whole tiny
pipeline under 2 minutes and the small preset under 8 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def import_seconds(lines: list[str]) -> float:
    """The cumulative time of a process's top-level imports, from its -X importtime lines."""
    total = 0
    for line in lines:
        m = IMPORT_LINE.match(line.strip("\n"))
        if m and len(m.group(3)) == 1:  # one space of indent: a top-level import
            total += int(m.group(2))
    return total / 1e6


def run_preset(preset: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{preset}-") as tmp:
        out = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "DS_ACCELERATOR": "cpu"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--preset", preset, "--out", str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"{preset}: the run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        record = json.loads((out / "latest" / "run.json").read_text())
        steps = []
        for step in record["steps"]:
            log = out / "logs" / f"{step['name']}.log"
            imports = import_seconds(log.read_text(errors="replace").splitlines()) if log.is_file() else 0.0
            steps.append({"name": step["name"], "seconds": step["seconds"], "imports": imports})
        cli_imports = import_seconds(proc.stderr.splitlines())
        return {"preset": preset, "wall": wall, "steps": steps, "cli_imports": cli_imports,
                "lines": len(proc.stdout.splitlines())}


def table(result: dict) -> str:
    wall = result["wall"]
    in_steps = sum(s["seconds"] for s in result["steps"])
    imports = sum(s["imports"] for s in result["steps"])
    rows = [f"### preset {result['preset']}: {wall:.1f} s in all, {result['lines']} lines of output", "",
            "| step | wall s | imports s | own work s | share of the run |", "|---|---:|---:|---:|---:|"]
    for s in result["steps"]:
        rows.append(f"| {s['name']} | {s['seconds']:.1f} | {s['imports']:.1f} | {s['seconds'] - s['imports']:.1f} "
                    f"| {s['seconds'] / wall:.1%} |")
    outside = wall - in_steps
    rows += [f"| (outside the steps: CLI start-up {result['cli_imports']:.1f} s of imports, DAG, kfp.local, summary) "
             f"| {outside:.1f} | | | {outside / wall:.1%} |", "",
             f"Outside the steps' own work (every step's imports + time outside the steps): "
             f"{imports + outside:.1f} s of {wall:.1f} s = {(imports + outside) / wall:.1%}.", ""]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores\n")
    for preset in args.presets:
        print(table(run_preset(preset)), flush=True)


if __name__ == "__main__":
    main()
