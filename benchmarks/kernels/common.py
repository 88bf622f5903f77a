"""What every kernel benchmark shares: the device, timing, peak memory, the table, the results file.

On a GPU each case is timed with `triton.testing.do_bench` (median of many runs after warm-up,
L2 flushed) and its peak memory is torch.cuda's max_memory_allocated above what was allocated
before the call. On a CPU there is no compiled Triton: the kernels run under TRITON_INTERPRET=1
(set here, before any kernel module is imported), so the scripts only run their small `--smoke`
shapes, check agreement with the reference and print wall-clock times that say nothing about
speed (the table says so). GPU runs save their table under benchmarks/results/ with the device
name and the date.

Each script (bench_<kernel>.py) builds a list of rows (dicts) and calls `report(name, rows, args)`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:  # before any kernels.* import: the @triton.jit functions interpret on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
RESULTS = Path(__file__).resolve().parents[1] / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, a few repetitions (always so on a CPU, where Triton interprets)")
    p.add_argument("--no-save", action="store_true", help="on a GPU, do not write benchmarks/results/")
    return p


def smoke(args: argparse.Namespace) -> bool:
    return args.smoke or not ON_GPU


def measure(fn: Callable[[], object], smoke_run: bool = False) -> dict:
    """{"ms": median milliseconds per call, "peak_mib": peak memory of one call above the baseline
    (GPU only; None on a CPU)}. fn takes no arguments; its result is dropped."""
    if ON_GPU:
        import triton.testing

        torch.cuda.synchronize()
        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=5 if smoke_run else 25, rep=20 if smoke_run else 100)
        return {"ms": float(ms), "peak_mib": peak}
    times = []
    for _ in range(1 if smoke_run else 3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "peak_mib": None}


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    """A GitHub-markdown table of rows (dicts with the same keys, in order)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu (TRITON_INTERPRET=1)"


def report(name: str, title: str, rows: list[dict], args: argparse.Namespace) -> str:
    """Print the table; on a GPU (and without --no-save) also save it as markdown and JSON under
    benchmarks/results/<date>-<device>/<name>.{md,json}. Returns the markdown."""
    head = f"## {title}\n\ndevice: {device_name()}, torch {torch.__version__}"
    if not ON_GPU:
        head += "\n\nCPU: the Triton kernels interpret, so times only show that the script runs; no speed claim."
    md = f"{head}\n\n{table(rows)}\n"
    print(md, flush=True)
    if ON_GPU and not args.no_save:
        slug = "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()
        out = RESULTS / f"{dt.date.today().isoformat()}-{slug}"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(md)
        (out / f"{name}.json").write_text(json.dumps(
            {"device": device_name(), "torch": torch.__version__, "date": dt.date.today().isoformat(),
             "rows": rows}, indent=1))
        print(f"saved {out / name}.md", flush=True)
    return md


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """A benchmark of a wrong kernel is worthless: stop with the case named when they disagree."""
    try:
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    except AssertionError as e:
        raise SystemExit(f"{name}: the kernel disagrees with the reference:\n{e}") from None
