"""Compression, measured: does the distilled student keep >= 95 % of the teacher's accuracy with
<= 50 % of its parameters, and does INT8 cost <= 1 point of accuracy for >= 3.5x smaller weights?

    .venv/bin/python benchmarks/compress.py --teacher runs/latest/train-finetune/model/model \
        --data runs/latest/split/splits                     # a teacher from `make run`
    .venv/bin/python benchmarks/compress.py                 # trains its own small-preset teacher first

Runs `distillery distill` and `distillery quantize` (the small preset unless --preset) on the
teacher and prints, side by side from that one run: held-out greedy accuracy, parameters and
bytes of teacher, student and the INT8 student, the ratios the issue sets targets for, and CPU
decode latency per token (batch 1) of the float and INT8 students, with the INT8 KV cache's
bytes ratio. Both students are evaluated on the same test problems as the teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages import cli  # noqa: E402  (the same subprocess runner: a failed command ends the benchmark)


def teacher_chain(root: Path, p: tuple[str, ...]) -> tuple[Path, Path]:
    """data -> base -> reinforce -> finetune with the preset; (finetune model folder, split folder)."""
    cli("data", "generate", "--out", str(root / "raw.jsonl"), *p)
    cli("validate", str(root / "raw.jsonl"), "--out", str(root / "validated"), *p)
    cli("filter", str(root / "validated/clean.jsonl"), "--out", str(root / "filtered"), *p)
    cli("split", str(root / "filtered/kept.jsonl"), "--out", str(root / "split"), *p)
    cli("train", "--stage", "base", "--data", str(root / "split"), "--out", str(root / "base"), *p)
    cli("train", "--stage", "reinforce", "--init", str(root / "base/model"), "--data", str(root / "split"),
        "--out", str(root / "reinforce"), *p)
    cli("train", "--stage", "finetune", "--init", str(root / "reinforce/model"), "--data", str(root / "split"),
        "--out", str(root / "finetune"), *p)
    return root / "finetune/model", root / "split"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="the teacher's model folder (default: train one with the preset)")
    parser.add_argument("--data", help="the split folder the teacher was trained on (with --teacher)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--keep", help="keep the runs in this folder instead of a temporary one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override for every command, e.g. --set distill.steps=600")
    args = parser.parse_args()
    if (args.teacher is None) != (args.data is None):
        parser.error("give --teacher and --data together, or neither")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="distillery-compress-"))
    root.mkdir(parents=True, exist_ok=True)
    p = ("--preset", args.preset, *(x for kv in args.set for x in ("--set", kv)))
    teacher, split = (Path(args.teacher), Path(args.data)) if args.teacher else teacher_chain(root, p)
    cli("distill", "--teacher", str(teacher), "--data", str(split), "--out", str(root / "distill"), "--fresh", *p)
    cli("quantize", "--checkpoint", str(root / "distill/model"), "--data", str(split), "--out", str(root / "int8"), *p)
    d = json.loads((root / "distill/metrics.json").read_text())
    q = json.loads((root / "int8/metrics.json").read_text())

    print(f"\n## Distillation and INT8 ({args.preset} preset, {d.get('test_rows', 0)} held-out problems, greedy)\n")
    print("| model | blocks | parameters | weight bytes | accuracy |")
    print("|---|---|---|---|---|")
    print(f"| teacher | {d['teacher_layers']} | {d['teacher_params']:,} | {d['teacher_bytes']:,} | "
          f"{d['teacher_accuracy']:.3f} |")
    print(f"| student (distilled) | {d['student_layers']} | {d['student_params']:,} | {d['student_bytes']:,} | "
          f"{d['student_accuracy']:.3f} |")
    print(f"| student INT8 | {d['student_layers']} | {d['student_params']:,} | {q['int8_bytes']:,} | "
          f"{q['int8_accuracy']:.3f} |")
    print("\n| claim | measured | target | met |")
    print("|---|---|---|---|")
    ratio = d.get("accuracy_ratio", float("nan"))  # absent when the teacher scores 0
    rows = [("student accuracy / teacher accuracy", ratio, ">= 0.95", ratio >= 0.95),
            ("student parameters / teacher parameters", d["param_ratio"], "<= 0.50", d["param_ratio"] <= 0.5),
            ("INT8 accuracy drop (points)", 100 * q["accuracy_drop"], "<= 1.0", 100 * q["accuracy_drop"] <= 1.0),
            ("float bytes / INT8 bytes (safetensors)", q["size_ratio"], ">= 3.5", q["size_ratio"] >= 3.5)]
    for name, value, target, met in rows:
        print(f"| {name} | {value:.3f} | {target} | {'yes' if met else 'NO'} |")
    print("\n| decode, batch 1, CPU | float | INT8 | INT8 / float |")
    print("|---|---|---|---|")
    print(f"| ms per token | {1e3 * q['float_s_per_token']:.2f} | {1e3 * q['int8_s_per_token']:.2f} | "
          f"{q['latency_ratio']:.2f} |")
    print(f"| KV cache bytes (fp32 / int8) | | | {q['kv_bytes_ratio']:.2f}x smaller |")
    print(f"| perplexity of reference answers | {q['float_perplexity']:.3f} | {q['int8_perplexity']:.3f} | "
          f"{q['int8_perplexity'] / q['float_perplexity']:.4f} |")
    print(f"\nteacher-made rows added to the distillation data: {d['teacher_rows']}; runs in {root}")


if __name__ == "__main__":
    main()
