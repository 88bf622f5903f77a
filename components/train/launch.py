"""The base stage on every accelerator of one pod: what the KFP `train_base` component and
`distillery train --stage base` both call.

    summary = launch.run_base(model_cfg, train_cfg, tok_cfg, out, data_dir)   # processes() ranks

A Kubeflow step that asks for 8 GPUs (cluster.gpus_per_node) runs one Python process; this starts
one training process per GPU with torch's elastic launcher (`torchrun --standalone`) on the
same configs, so the step's train.pipeline_parallel x tensor_parallel x data-parallel layout
spans the pod's GPUs (components/train/parallel). Several nodes go through the training job
that `distillery render-job` writes instead (a PyTorchJob or TrainJob).

How many processes: $DISTILLERY_PROCESSES when set, else the visible CUDA devices, else 1 (in
the same process, no launcher: the local run and CPU pods). A process that a launcher already
started (`deepspeed --num_gpus N --module pipelines.cli train ...`, a PyTorchJob's torchrun: $RANK
is set) trains in itself, as one rank of that launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from components.config import ConfigError
from components.errors import InputError, command


def processes() -> int:
    """Training processes for this pod (see the module docstring)."""
    value = os.environ.get("DISTILLERY_PROCESSES", "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"$DISTILLERY_PROCESSES: {value!r} is not a positive whole number")
        return int(value)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def run_base(model_cfg, train_cfg, tok_cfg, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
             nprocs: int | None = None, init_dir: str | os.PathLike | None = None,
             text: str | os.PathLike | None = None, fresh: bool = False) -> dict[str, Any]:
    """base.run on `nprocs` processes (default `processes()`; in this process when a launcher
    started it); returns its summary. `data_dir` (a split folder) or `text` (a corpus), one of
    them; `init_dir`: a model folder to continue pretraining; `fresh`: remove earlier outputs."""
    from components.train import base

    nprocs = processes() if nprocs is None else nprocs
    if nprocs <= 1 or "RANK" in os.environ:
        return base.run(model_cfg, train_cfg, tok_cfg, out_dir, data_dir=data_dir, text=text, fresh=fresh,
                        init_dir=init_dir)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "base.json"
        spec.write_text(json.dumps({"model": asdict(model_cfg), "train": asdict(train_cfg),
                                    "tokenizer": asdict(tok_cfg), "out": str(out_dir),
                                    "data": None if data_dir is None else str(data_dir),
                                    "text": None if text is None else str(text), "fresh": fresh,
                                    "init": None if init_dir is None else str(init_dir)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
               "-m", "components.train.launch", str(spec)]
        code = subprocess.run(cmd).returncode
    if code != 0:
        raise InputError(f"train base: {nprocs} training processes failed (exit status {code}); "
                         f"their output is above")
    return json.loads((Path(out_dir) / "metrics.json").read_text(encoding="utf-8"))


@command("distillery train")
def main(argv: list[str] | None = None) -> int:
    """One rank, started by `run_base` through torchrun."""
    from components.config import from_dict
    from components.model import ModelConfig
    from components.train import base
    from components.train.config import TokenizerConfig, TrainConfig

    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    base.run(from_dict(ModelConfig, spec["model"], "model"), from_dict(TrainConfig, spec["train"], "train"),
             from_dict(TokenizerConfig, spec["tokenizer"], "tokenizer"), spec["out"], data_dir=spec["data"],
             text=spec.get("text"), fresh=bool(spec.get("fresh")) and os.environ.get("RANK", "0") == "0",
             init_dir=spec.get("init"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
