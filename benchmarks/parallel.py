"""3D parallelism on the CPU, measured: tokens/s for 1, 2 and 4 processes, and the bytes each
parallel mode communicates per step, computed from the model's shapes and measured on the wire.

    .venv/bin/python benchmarks/parallel.py            # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/parallel.py --quick    # fewer steps and layouts, a smoke run

Every layout trains the same model (4 blocks, width 128, 4 heads, context 64, byte tokenizer) on
../shared/data/tinyshakespeare with the same global batch (4 micro-batches of 4 sequences), in
fp32, through `components.train.engine.train` under the deepspeed launcher (gloo). dp-only
layouts take the data-parallel engine (ZeRO-1); any pp or tp > 1 the 3D path
(components/train/parallel).

Bytes: each worker wraps torch.distributed's collectives and point-to-point calls while a
training step runs and adds up the bytes each rank hands to them (all-reduce: the tensor;
all-gather: the rank's input; send: the tensor; receives are not counted, they mirror sends),
sorted by the process group: the tensor-parallel slice, the data-parallel group, the pipeline
(sends between stages and the tied embedding's gradient all-reduce between the end stages), or
other (gradient-norm and loss scalars). The computed column is the formula below for the same
layout; the ratio shows where DeepSpeed sends more than the model needs (padding, metadata).

Honest caveat: 2 cores run 4 processes here, and gloo over loopback stands in for NVLink and
InfiniBand, so tokens/s falls with more processes; the byte counts are what carries to a cluster.
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
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
B, T, C, L, H, MICRO = 4, 64, 128, 4, 4, 4  # sequences per micro-batch, context, width, blocks, heads, global micro-batches
F32 = 4
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2)]  # (dp, tp, pp)
QUICK = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (1, 2, 2)]


# ---- worker: one rank of one layout ---------------------------------------------------------------

def worker(out: str, tp: int, pp: int, steps: int) -> None:
    import torch
    import torch.distributed as td

    from components.model import ByteTokenizer, ModelConfig
    from components.train import engine
    from components.train.batches import StreamBatches
    from components.train.config import TrainConfig

    counts: dict[str, float] = {}
    state = {"on": False, "steps": 0}
    groups: dict[str, set[tuple[int, ...]]] = {}

    def kind(op: str, group) -> str:
        if op in ("send", "isend"):
            return "pipeline"
        ranks = tuple(td.get_process_group_ranks(group)) if group is not None else tuple(range(td.get_world_size()))
        if len(ranks) == 1:
            return "none"
        for name in ("tensor", "data", "pipeline"):
            if ranks in groups.get(name, ()):
                return name
        return "other"

    def wrap(op: str) -> None:
        import inspect

        real = getattr(td, op)
        sig = inspect.signature(real)

        def counted(*args, **kwargs):
            if state["on"]:
                bound = sig.bind_partial(*args, **kwargs).arguments
                t = next(bound[k] for k in ("tensor", "input_tensor", "input") if k in bound)
                counts_key = kind(op, bound.get("group"))
                counts[counts_key] = counts.get(counts_key, 0) + t.numel() * t.element_size()
            return real(*args, **kwargs)

        setattr(td, op, counted)

    for op in ("all_reduce", "send", "isend", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        wrap(op)

    def measured(step_fn):
        def step(self, step):
            eng = self.par.engine if hasattr(self, "par") else self.engine
            if not groups:
                from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

                topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=td.get_world_size() // (pp * tp))
                for name, axis in (("tensor", "model"), ("data", "data"), ("pipeline", "pipe")):
                    groups[name] = {tuple(r) for r in topo.get_axis_comm_lists(axis)}
            # this rank's trained parameters (its stage and slice), for the ZeRO formula
            state["params"] = sum(p.numel() for p in eng.module.parameters() if p.requires_grad)
            state["on"] = step > 0  # the first step sends the pipeline's shape metadata; leave it out
            state["steps"] += step > 0
            try:
                return step_fn(self, step)
            finally:
                state["on"] = False
        return step

    from components.train.parallel.trainer import PipelineTrainer

    engine.DataParallel.step = measured(engine.DataParallel.step)
    PipelineTrainer.step = measured(PipelineTrainer.step)

    tok = ByteTokenizer()
    ids = torch.tensor(tok.encode(SHAKESPEARE.read_text(encoding="utf-8")[:400_000]), dtype=torch.long)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // (tp * pp)
    model_cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=L, n_head=H, n_embd=C, block_size=T, kernels="torch")
    cfg = TrainConfig(steps=steps, micro_batch=B, grad_accum=MICRO // dp, lr=1e-3, warmup_steps=1, precision="fp32",
                      zero_stage=1, checkpoint_every=10**6, eval_every=0, eval_batches=1, pipeline_parallel=pp,
                      tensor_parallel=tp, curriculum_start=1.0)
    run = Path(out) / "run"
    engine.train(model_cfg, cfg, engine.LanguageModeling(StreamBatches(ids, T, B, 0)), None, tok, run, progress=False)
    rank = td.get_rank()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "counts": {k: v / max(state["steps"], 1) for k, v in counts.items()}, "params": state["params"],
        "tokens_per_s": [r["tokens_per_s"] for r in rows[1:]]}))


# ---- the formulas ------------------------------------------------------------------------------

def computed(dp: int, tp: int, pp: int, ranks: list[dict]) -> dict[str, float]:
    """Bytes per step summed over every rank, from the shapes (fp32 everywhere)."""
    accum = MICRO // dp
    act = B * T * C * F32  # one (B, T, C) activation or its gradient
    from components.model import ByteTokenizer

    vocab = ByteTokenizer().vocab_size
    out = {"tensor": 0.0, "pipeline": 0.0, "data": 0.0}
    if tp > 1:  # per micro-batch and slice rank: 4 per block (2 forward, 2 backward), embedding, head, 3 loss scalars per token
        per_micro = L * 4 * act + act + act + 3 * B * T * F32
        out["tensor"] = dp * tp * accum * per_micro
    if pp > 1:  # each stage boundary: the activation forward, its gradient backward; the tied embedding's grads
        out["pipeline"] = dp * tp * accum * (pp - 1) * 2 * act + 2 * dp * tp * (-(-vocab // tp)) * C * F32
    if dp > 1:  # ZeRO-1: every gradient all-reduced, then the updated shard all-gathered
        out["data"] = sum(r["params"] * F32 * (1 + 1 / dp) for r in ranks)
    return out


# ---- driver --------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_layout(dp: int, tp: int, pp: int, steps: int) -> dict:
    procs = dp * tp * pp
    with tempfile.TemporaryDirectory() as out:
        launcher = [] if procs == 1 else ["-m", "deepspeed.launcher.runner", "--num_gpus", str(procs),
                                          "--master_port", str(free_port())]
        cmd = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", out, str(tp), str(pp), str(steps)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"layout dp={dp} tp={tp} pp={pp} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(procs)]
    measured: dict[str, float] = {}
    for r in ranks:
        for k, v in r["counts"].items():
            measured[k] = measured.get(k, 0) + v
    return {"tokens_per_s": statistics.median(ranks[0]["tokens_per_s"]), "measured": measured,
            "computed": computed(dp, tp, pp, ranks)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 layouts, 4 steps: a smoke run")
    ap.add_argument("--worker", nargs=4, metavar=("OUT", "TP", "PP", "STEPS"), help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)  # the deepspeed launcher adds --local_rank
    if args.worker:
        out, tp, pp, steps = args.worker
        worker(out, int(tp), int(pp), int(steps))
        return 0
    if not SHAKESPEARE.is_file():
        sys.exit(f"benchmark needs {SHAKESPEARE} (../shared/data beside the checkout)")
    layouts, steps = (QUICK, 4) if args.quick else (LAYOUTS, 8)
    results = {}
    for dp, tp, pp in layouts:
        print(f"... dp={dp} tp={tp} pp={pp}", file=sys.stderr, flush=True)
        results[(dp, tp, pp)] = run_layout(dp, tp, pp, steps)
    base = results[(1, 1, 1)]["tokens_per_s"]
    print(f"\n3D parallelism on this CPU ({os.cpu_count()} cores, gloo): model L={L} C={C} H={H} T={T}, "
          f"global batch {MICRO}x{B} sequences, fp32, median of steps 2..{steps}\n")
    print("| procs | dp | tp | pp | tokens/s | vs 1 proc |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (dp, tp, pp), r in results.items():
        print(f"| {dp * tp * pp} | {dp} | {tp} | {pp} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x |")
    print("\nBytes communicated per optimizer step, all ranks together (MB = 1e6 bytes):\n")
    print("| dp | tp | pp | mode | computed MB | measured MB | measured / computed |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    for (dp, tp, pp), r in results.items():
        for mode in ("tensor", "pipeline", "data", "other"):
            c, m = r["computed"].get(mode, 0.0), r["measured"].get(mode, 0.0)
            if c == 0 and m == 0:
                continue
            ratio = f"{m / c:.3f}" if c else "-"
            print(f"| {dp} | {tp} | {pp} | {mode} | {c / 1e6:.3f} | {m / 1e6:.3f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
