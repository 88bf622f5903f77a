"""Kubeflow Pipelines components of the training stages: the KFP interface and nothing else.

(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_base(splits: Input[Dataset], tokenizer_config: dict, model_config: dict, train_config: dict,
               model: Output[Model], metrics: Output[Metrics], loss_curve: Output[HTML]):
    """Base-stage pretraining on DeepSpeed from the split's train/val rows; the output folder
    holds the checkpoints, metrics.jsonl, loss.png and model/ (safetensors + tokenizer)."""
    import base64
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import log_metrics
    from components.model import ModelConfig
    from components.train import base
    from components.train.config import TokenizerConfig, TrainConfig

    summary = base.run(from_dict(ModelConfig, model_config, "model"), from_dict(TrainConfig, train_config, "train"),
                       from_dict(TokenizerConfig, tokenizer_config, "tokenizer"), model.path, data_dir=splits.path,
                       progress=False)
    log_metrics(metrics, summary)
    png = base64.b64encode((Path(model.path) / "loss.png").read_bytes()).decode("ascii")
    Path(loss_curve.path).write_text(f'<!doctype html><meta charset="utf-8"><title>base stage loss</title>'
                                     f'<img alt="loss curve" src="data:image/png;base64,{png}">', encoding="utf-8")
