"""Kubeflow Pipelines components of the compression steps: the KFP interface and nothing else.

Each takes every preset's sections for its step (`config`, a compile-time constant), the run's
`preset` and the run form's flat values for it (0: the preset's), resolved by `preset_config`
(components/kfp_io.py).
(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(teacher: Input[Model], splits: Input[Dataset], preset: str, config: dict,
            model: Output[Model], metrics: Output[Metrics], distill_steps: int = 0, distill_lr: float = 0.0):
    """A smaller student trained on the teacher's logits; student and teacher accuracy and size
    in the metrics. The output folder holds checkpoints, metrics.jsonl, loss.png and model/."""
    from pathlib import Path

    from components.compress import distill as step
    from components.compress.config import DistillConfig
    from components.config import from_dict
    from components.kfp_io import log_metrics, preset_config, training_dir

    cfg = preset_config(config, preset, {"distill.steps": distill_steps, "distill.lr": distill_lr})
    kd = from_dict(DistillConfig, cfg["distill"], "distill")
    with training_dir(model, "distill", teacher, splits, kd) as work:  # kfp_io.training_dir
        summary = step.run(kd, str(Path(teacher.path) / "model"), splits.path, work)
    log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def quantize(float_model: Input[Model], splits: Input[Dataset], preset: str, config: dict,
             model: Output[Model], metrics: Output[Metrics]):
    """INT8 weights (per output channel) and INT8 KV cache; accuracy, size and CPU latency before
    and after in the metrics. The output folder holds model/ (the INT8 artifact)."""
    from pathlib import Path

    from components.compress import quantize as step
    from components.compress.config import QuantizeConfig
    from components.config import from_dict
    from components.kfp_io import log_metrics, preset_config

    cfg = from_dict(QuantizeConfig, preset_config(config, preset)["quantize"], "quantize")
    summary = step.run(cfg, str(Path(float_model.path) / "model"), splits.path, model.path)
    log_metrics(metrics, summary)
