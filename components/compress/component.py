"""Kubeflow Pipelines components of the compression steps: the KFP interface and nothing else.

(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(teacher: Input[Model], splits: Input[Dataset], distill_config: dict,
            model: Output[Model], metrics: Output[Metrics]):
    """A smaller student trained on the teacher's logits; student and teacher accuracy and size
    in the metrics. The output folder holds checkpoints, metrics.jsonl, loss.png and model/."""
    from pathlib import Path

    from components.compress import distill as step
    from components.compress.config import DistillConfig
    from components.config import from_dict
    from components.kfp_io import log_metrics, training_dir

    with training_dir(model, "distill", teacher, splits, distill_config) as work:  # kfp_io.training_dir
        summary = step.run(from_dict(DistillConfig, distill_config, "distill"), str(Path(teacher.path) / "model"),
                           splits.path, work)
    log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def quantize(float_model: Input[Model], splits: Input[Dataset], quantize_config: dict,
             model: Output[Model], metrics: Output[Metrics]):
    """INT8 weights (per output channel) and INT8 KV cache; accuracy, size and CPU latency before
    and after in the metrics. The output folder holds model/ (the INT8 artifact)."""
    from pathlib import Path

    from components.compress import quantize as step
    from components.compress.config import QuantizeConfig
    from components.config import from_dict
    from components.kfp_io import log_metrics

    summary = step.run(from_dict(QuantizeConfig, quantize_config, "quantize"), str(Path(float_model.path) / "model"),
                       splits.path, model.path)
    log_metrics(metrics, summary)
