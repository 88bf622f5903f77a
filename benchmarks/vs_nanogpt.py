"""Our base stage against nanoGPT's CPU recipe, side by side on one machine (the same torch).

nanoGPT is not part of this repository; bring a checkout (git clone / git archive of
karpathy/nanoGPT) and prepare its character-level Shakespeare from ../shared/data (nothing
downloaded):

    cp ../shared/data/tinyshakespeare/input.txt NANOGPT/data/shakespeare_char/
    (cd NANOGPT/data/shakespeare_char && ../../../distillery/.venv/bin/python prepare.py)

Then, from the repository root:

    .venv/bin/python benchmarks/vs_nanogpt.py --nanogpt NANOGPT             # speed, sliced (~10 min)
    .venv/bin/python benchmarks/vs_nanogpt.py --nanogpt NANOGPT --full      # 2,000-step val loss (~5 min)
    .venv/bin/python benchmarks/vs_nanogpt.py --nanogpt NANOGPT --rounds 6  # speed, whole-process rounds
    .venv/bin/python benchmarks/vs_nanogpt.py --profile                     # where our step's time goes
    .venv/bin/python benchmarks/vs_nanogpt.py --nanogpt NANOGPT --ours /tmp/before .   # two checkouts of ours

Without --nanogpt (or $NANOGPT) the comparison says it is skipped and exits 0, so `make bench`
goes on.

Configuration (nanoGPT README, CPU): config/train_shakespeare_char.py --device=cpu --compile=False
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0, lr 1e-3 cosine
to 1e-4 over 2000 iterations, 100 warm-up, AdamW (0.9, 0.99), weight decay 0.1, clip 1.0, fp32.
Ours: components/train/engine.py train() (DeepSpeed, one process, ZeRO 0) with the same numbers,
model components/model/model.py (RoPE, RMSNorm, SwiGLU, byte vocab 258), precision fp32.

Speed, sliced (the default): every side runs at once as a long-lived process, but only one at a
time: each gets --slice-s seconds, then is paused (SIGSTOP) and the next resumed (SIGCONT), the
order reversed every other round, so a shared machine's drift hits all sides alike. Per round the
ratio is ours / nanoGPT's median tokens/s in their slices; the figure is the median of the rounds'
ratios, with quartiles. Per-step time is one whole loop iteration on each side: nanoGPT's own `dt`
(batch, lr, forward, backward, clip, step, log) and for ours the time between consecutive entries
of the objective's step (batch, forward, backward, clip, step, scheduler, metrics line).
tokens/s = 12 * 64 / step time. Both sides run the same thread count, set and printed.
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
from pathlib import Path

NANOGPT = Path(os.environ.get("NANOGPT", ""))  # set from --nanogpt in main()
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TOKENS_PER_STEP = 12 * 64


def nanogpt_args(steps: int, eval_iters: int, eval_interval: int) -> list[str]:
    return ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", f"--eval_iters={eval_iters}",
            "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
            f"--max_iters={steps}", "--lr_decay_iters=2000", "--dropout=0.0", f"--eval_interval={eval_interval}",
            "--always_save_checkpoint=False", f"--out_dir={tempfile.gettempdir()}/nanogpt_out"]


def run_nanogpt(steps: int, threads: int, eval_iters: int = 20, eval_interval: int = 10**9) -> dict:
    boot = ("import sys, runpy, torch; torch.set_num_threads(%d); print('threads', torch.get_num_threads(), flush=True);"
            "sys.path.insert(0, '.'); sys.argv = ['train.py'] + %r; runpy.run_path('train.py', run_name='__main__')"
            % (threads, nanogpt_args(steps, eval_iters, eval_interval)))
    out = subprocess.run([PY, "-c", boot], cwd=NANOGPT, capture_output=True, text=True, env=_env(threads))
    if out.returncode:
        sys.exit(f"nanoGPT failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    times = {int(i): float(ms) / 1000 for i, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out.stdout)}
    evals = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", out.stdout)
    threads_seen = int(re.search(r"threads (\d+)", out.stdout).group(1))
    return {"step_s": [times[i] for i in sorted(times)], "evals": evals, "threads": threads_seen}


def run_ours(steps: int, threads: int, eval_batches: int = 20, validate: bool = False, repo: Path = REPO) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [PY, __file__, "--worker", f.name, "--steps", str(steps), "--threads", str(threads),
               "--eval-batches", str(eval_batches), "--repo", str(repo)] + (["--validate"] if validate else [])
        out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=_env(threads))
        if out.returncode:
            sys.exit(f"ours failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return json.loads(Path(f.name).read_text())


def _env(threads: int) -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


# ---- ours, in a worker process ---------------------------------------------------------------

def _ours_setup(steps: int, eval_batches: int, repo: Path = REPO):
    sys.path.insert(0, str(repo))
    import torch

    from components.model import ByteTokenizer, ModelConfig
    from components.train.batches import StreamBatches
    from components.train.config import TrainConfig

    ids = torch.tensor(ByteTokenizer().encode(SHAKESPEARE.read_text(encoding="utf-8")), dtype=torch.long)
    cut = int(ids.numel() * 0.9)  # nanoGPT's split: first 90 % train, last 10 % val (ASCII: bytes = chars)
    train_b, val_b = StreamBatches(ids[:cut], 64, 12, 0), StreamBatches(ids[cut:], 64, 12, 1)
    model_cfg = ModelConfig(vocab_size=ByteTokenizer().vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=64,
                            dropout=0.0)
    cfg = TrainConfig(steps=steps, micro_batch=12, lr=1e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1,
                      beta1=0.9, beta2=0.99, grad_clip=1.0, precision="fp32", checkpoint_every=10**6,
                      eval_every=0, eval_batches=eval_batches)
    return model_cfg, cfg, train_b, val_b


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model_cfg, cfg, train_b, val_b = _ours_setup(args.steps, args.eval_batches, Path(args.repo))
    import components
    assert Path(components.__file__).resolve().is_relative_to(Path(args.repo).resolve()), components.__file__
    from components.model import ByteTokenizer
    from components.train.engine import LanguageModeling, train

    class Timed(LanguageModeling):  # the same objective, with a timestamp at each step's start
        stamps: list[float] = []
        threads: list[int] = []

        def step(self, engine, step, rank, world):
            self.stamps.append(time.perf_counter())
            self.threads.append(torch.get_num_threads())
            if args.live:  # for the sliced comparison: one line per step as it starts
                print(f"ourstep {step} {self.stamps[-1]:.6f} threads {self.threads[-1]}", flush=True)
            return super().step(engine, step, rank, world)

    objective = Timed(train_b)
    with tempfile.TemporaryDirectory() as out:
        summary = train(model_cfg, cfg, objective, val_b if args.validate else None, ByteTokenizer(), out,
                        progress=False)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    s = Timed.stamps
    Path(args.worker).write_text(json.dumps({
        "step_s": [b - a for a, b in zip(s, s[1:])],  # whole loop iterations (the last one is not closed)
        "engine_tok_s": [r["tokens_per_s"] for r in rows], "summary": summary,
        "threads": sorted(set(Timed.threads))}))


def profile(args) -> None:
    """torch.profiler over 60 steps of ours (after 30 warm-up steps), in this process."""
    import torch
    from torch.profiler import ProfilerActivity, profile as prof, schedule

    torch.set_num_threads(args.threads)
    model_cfg, cfg, train_b, _ = _ours_setup(90, 20)
    from components.model import ByteTokenizer
    from components.train.engine import LanguageModeling, train

    p = prof(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=30, active=60, repeat=1))

    class Profiled(LanguageModeling):
        def step(self, engine, step, rank, world):
            r = super().step(engine, step, rank, world)
            p.step()
            return r

    with p, tempfile.TemporaryDirectory() as out:
        train(model_cfg, cfg, Profiled(train_b), None, ByteTokenizer(), out, progress=False)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


# ---- the comparison --------------------------------------------------------------------------

def speed(args) -> None:
    sides = ["nanoGPT"] + [f"ours:{r}" for r in args.ours]
    print(f"{args.rounds} rounds x {args.steps} steps, the order rotating each round; median tokens/s of steps "
          f"{args.skip}.., {args.threads} threads\n")
    print("round | order | " + " | ".join(f"{s} tok/s" for s in sides) + " | " + " | ".join(
        f"ratio {s}" for s in sides[1:]))
    print("--- | --- | " + " | ".join("---" for _ in sides) + " | " + " | ".join("---" for _ in sides[1:]))
    rates = {s: [] for s in sides}
    ratios = {s: [] for s in sides[1:]}
    for r in range(args.rounds):
        k = r % len(sides)
        order = sides[k:] + sides[:k]
        if (r // len(sides)) % 2:
            order = order[::-1]
        for side in order:
            res = (run_nanogpt(args.steps, args.threads) if side == "nanoGPT"
                   else run_ours(args.steps, args.threads, repo=Path(side[5:])))
            assert res["threads"] in (args.threads, [args.threads]), res["threads"]
            rates[side].append(statistics.median(TOKENS_PER_STEP / t for t in res["step_s"][args.skip:]))
        for side in sides[1:]:
            ratios[side].append(rates[side][-1] / rates["nanoGPT"][-1])
        print(f"{r + 1} | {' > '.join(o.split('/')[-1] for o in order)} | "
              + " | ".join(f"{rates[s][-1]:,.0f}" for s in sides) + " | "
              + " | ".join(f"{ratios[s][-1]:.3f}" for s in sides[1:]), flush=True)
    print()
    for side in sides[1:]:
        x = ratios[side]
        print(f"{side}: ratio to nanoGPT, median {statistics.median(x):.3f} (rounds {min(x):.3f} .. {max(x):.3f}); "
              f"median tok/s {statistics.median(rates[side]):,.0f} vs nanoGPT {statistics.median(rates['nanoGPT']):,.0f}")


def sliced(args) -> None:
    """All sides run at once as long-lived processes, but only one at a time: each gets `slice_s`
    seconds, then is paused (SIGSTOP) and the next resumed (SIGCONT), round after round, the order
    reversed every other round. A step is credited to the slice in which its line arrived; steps
    spanning a pause (longer than the slice) and each side's first `skip` steps are dropped. Per round,
    the ratio of each of ours to nanoGPT is the ratio of the two slices' median tokens/s."""
    import signal
    import threading

    sides = ["nanoGPT"] + [f"ours:{r}" for r in args.ours]
    procs, lines = {}, {s: [] for s in sides}
    slice_of = {"now": None}
    for side in sides:
        if side == "nanoGPT":
            boot = ("import sys, runpy, torch; torch.set_num_threads(%d); print('threads', torch.get_num_threads(), "
                    "flush=True); sys.path.insert(0, '.'); sys.argv = ['train.py'] + %r; "
                    "runpy.run_path('train.py', run_name='__main__')" % (args.threads, nanogpt_args(10**6, 20, 10**9)))
            cmd, cwd = [PY, "-c", boot], NANOGPT
        else:
            repo = side[5:]
            cmd = [PY, __file__, "--worker", "/dev/null", "--steps", str(10**6), "--threads", str(args.threads),
                   "--eval-batches", "20", "--repo", repo, "--live"]
            cwd = repo
        procs[side] = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                       env=_env(args.threads))
        procs[side].send_signal(signal.SIGSTOP)

    def reader(side):
        for line in procs[side].stdout:
            lines[side].append((slice_of["now"], time.perf_counter(), line))

    for side in sides:
        threading.Thread(target=reader, args=(side,), daemon=True).start()
    # start-up (imports, DeepSpeed, nanoGPT's first estimate_loss) one side at a time, untimed
    for side in sides:
        slice_of["now"] = None
        procs[side].send_signal(signal.SIGCONT)
        while not any(("iter 5:" in l or "ourstep 5 " in l) for _, _, l in lines[side]):
            time.sleep(0.2)
        procs[side].send_signal(signal.SIGSTOP)
    try:
        for r in range(args.slices):
            order = sides if r % 2 == 0 else sides[::-1]
            for side in order:
                slice_of["now"] = (r, side)
                procs[side].send_signal(signal.SIGCONT)
                time.sleep(args.slice_s)
                procs[side].send_signal(signal.SIGSTOP)
                time.sleep(0.3)  # let the last lines arrive under this slice's tag
            slice_of["now"] = None
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    # per (round, side): step seconds from the lines of that slice
    per = {}
    for side in sides:
        prev = None
        for tag, _, line in lines[side]:
            if side == "nanoGPT":
                m = re.search(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", line)
                if not m:
                    continue
                i, dt = int(m.group(1)), float(m.group(2)) / 1000
            else:
                m = re.search(r"ourstep (\d+) ([\d.]+) threads (\d+)", line)
                if not m:
                    continue
                assert int(m.group(3)) == args.threads
                i, t = int(m.group(1)), float(m.group(2))
                dt, prev = (None if prev is None else t - prev[1]), (i, t)
                i -= 1  # dt closes the previous step
            if tag is None or dt is None or i < args.skip or dt > args.slice_s:
                continue
            per.setdefault(tag, []).append(dt)
    print(f"{args.slices} rounds of {args.slice_s:g} s per side (order reversed every other round), "
          f"{args.threads} threads; per slice: median tokens/s of its steps\n")
    print("round | " + " | ".join(f"{s.split('/')[-1]} tok/s (steps)" for s in sides) + " | "
          + " | ".join(f"ratio {s.split('/')[-1]}" for s in sides[1:]))
    print("--- | " + " | ".join("---" for _ in sides) + " | " + " | ".join("---" for _ in sides[1:]))
    ratios = {s: [] for s in sides[1:]}
    rates = {s: [] for s in sides}
    for r in range(args.slices):
        if not all((r, s) in per and len(per[(r, s)]) >= 3 for s in sides):
            print(f"{r + 1} | (a slice with under 3 steps: skipped)")
            continue
        rate = {s: statistics.median(TOKENS_PER_STEP / t for t in per[(r, s)]) for s in sides}
        for s in sides:
            rates[s].append(rate[s])
        for s in sides[1:]:
            ratios[s].append(rate[s] / rate["nanoGPT"])
        print(f"{r + 1} | " + " | ".join(f"{rate[s]:,.0f} ({len(per[(r, s)])})" for s in sides) + " | "
              + " | ".join(f"{rate[s] / rate['nanoGPT']:.3f}" for s in sides[1:]))
    print()
    for s in sides[1:]:
        x = sorted(ratios[s])
        q1, q3 = x[len(x) // 4], x[(3 * len(x)) // 4]
        print(f"{s}: ours / nanoGPT tokens/s, median over {len(x)} rounds {statistics.median(x):.3f} "
              f"(quartiles {q1:.3f} .. {q3:.3f}, range {x[0]:.3f} .. {x[-1]:.3f}); median tok/s "
              f"{statistics.median(rates[s]):,.0f} vs nanoGPT {statistics.median(rates['nanoGPT']):,.0f}")


def full(args) -> None:
    steps = 2000
    n = run_nanogpt(steps, args.threads, eval_iters=args.eval_batches, eval_interval=steps)
    last = n["evals"][-1]
    print(f"{steps} steps, val loss over {args.eval_batches} batches of 12 x 64\n")
    print("side | val loss | train loss | median tok/s (steps 50..)")
    print("--- | --- | --- | ---")
    print(f"nanoGPT | {float(last[2]):.4f} | {float(last[1]):.4f} (estimate_loss at step {last[0]}) | "
          f"{statistics.median(TOKENS_PER_STEP / t for t in n['step_s'][50:]):,.0f}", flush=True)
    for repo in args.ours:
        o = run_ours(steps, args.threads, eval_batches=args.eval_batches, validate=True, repo=Path(repo))
        print(f"ours:{repo} | {o['summary']['val_loss']:.4f} | {o['summary']['final_loss']:.4f} (last 10 steps' mean) | "
              f"{statistics.median(TOKENS_PER_STEP / t for t in o['step_s'][50:]):,.0f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nanogpt", default=os.environ.get("NANOGPT"), help="a nanoGPT checkout, its "
                    "data/shakespeare_char prepared (see the top of this file)")
    ap.add_argument("--rounds", type=int, default=0, help="whole-process rounds instead of slices")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--eval-batches", type=int, default=200)
    ap.add_argument("--ours", nargs="+", default=[str(REPO)], help="checkouts of ours to time (e.g. a before copy)")
    ap.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--validate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slices", type=int, default=60, help="sliced speed comparison: this many rounds of "
                    "--slice-s seconds per side, the processes paused and resumed in turn (SIGSTOP/SIGCONT)")
    ap.add_argument("--slice-s", type=float, default=3.0)
    args = ap.parse_args()
    args.ours = [str(Path(r).resolve()) for r in args.ours]
    if not args.worker and not args.profile:
        global NANOGPT
        if not args.nanogpt:
            print("skipped: needs a nanoGPT checkout (--nanogpt PATH or $NANOGPT; see the top of this file)")
            return
        NANOGPT = Path(args.nanogpt).resolve()
        if not (NANOGPT / "data" / "shakespeare_char" / "train.bin").is_file():
            sys.exit(f"{NANOGPT}/data/shakespeare_char/train.bin not found: run its prepare.py first "
                     "(see the top of this file)")
    if not SHAKESPEARE.is_file():
        sys.exit(f"benchmark needs {SHAKESPEARE} (../shared/data beside the checkout)")
    if args.worker:
        worker(args)
    elif args.profile:
        profile(args)
    elif args.full:
        full(args)
    elif args.rounds:
        speed(args)
    else:
        sliced(args)


if __name__ == "__main__":
    main()
