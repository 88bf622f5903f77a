"""Kubeflow Pipelines components of the training stages: the KFP interface and nothing else.

Each takes every preset's sections for its step (`config`, a compile-time constant), the run's
`preset` and the run form's flat values for it (0: the preset's), resolved by `preset_config`
(components/kfp_io.py). On a cluster the training steps train on the mounted checkpoint volume,
keyed by the resolved configs, so a retried pod resumes (components/kfp_io.py `training_dir`).
(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_base(splits: Input[Dataset], preset: str, config: dict, model: Output[Model], metrics: Output[Metrics],
               loss_curve: Output[HTML], train_steps: int = 0, train_lr: float = 0.0, base_model: str = ""):
    """Base-stage pretraining on DeepSpeed from the split's train/val rows, one process per GPU
    of the pod (components/train/launch.py: the train.pipeline_parallel x tensor_parallel layout
    spans them); the output folder holds the checkpoints, metrics.jsonl, loss.png and model/.
    `base_model` (a path or hf://org/name, components/model/hf.py resolve_base_model): continued
    pretraining of that model instead of training one from scratch."""
    import tempfile
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import html_page, log_metrics, preset_config, training_dir
    from components.model import ModelConfig
    from components.model.hf import resolve_base_model
    from components.train import launch
    from components.train.config import TokenizerConfig, TrainConfig

    cfg = preset_config(config, preset, {"train.steps": train_steps, "train.lr": train_lr})
    tok = from_dict(TokenizerConfig, cfg["tokenizer"], "tokenizer")
    arch, train = from_dict(ModelConfig, cfg["model"], "model"), from_dict(TrainConfig, cfg["train"], "train")
    key = (splits, tok, arch, train) + ((base_model,) if base_model else ())  # the same key as ever from scratch
    with training_dir(model, "train-base", *key) as work, \
            tempfile.TemporaryDirectory(prefix="base-model-") as imported:  # not in the artifact: a copy
        init = resolve_base_model(base_model, imported) if base_model else None
        summary = launch.run_base(arch, train, tok, work, splits.path, init_dir=init)
    log_metrics(metrics, summary)
    html_page(loss_curve.path, "base stage loss", [str(Path(model.path) / "loss.png")])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_reinforce(base_model: Input[Model], splits: Input[Dataset], preset: str, config: dict,
                    model: Output[Model], metrics: Output[Metrics], rewards_curve: Output[HTML],
                    reinforce_steps: int = 0, reinforce_lr: float = 0.0):
    """GRPO with verifiable rewards from the base stage's model; the output folder holds the
    checkpoints, metrics.jsonl, rewards.png and model/."""
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import html_page, log_metrics, preset_config, training_dir
    from components.train import stages
    from components.train.config import ReinforceConfig

    cfg = preset_config(config, preset, {"reinforce.steps": reinforce_steps, "reinforce.lr": reinforce_lr})
    rl = from_dict(ReinforceConfig, cfg["reinforce"], "reinforce")
    with training_dir(model, "train-reinforce", base_model, splits, rl) as work:
        summary = stages.run_reinforce(rl, str(Path(base_model.path) / "model"), splits.path, work)
    log_metrics(metrics, summary)
    html_page(rewards_curve.path, "GRPO rewards", [str(Path(model.path) / "rewards.png"),
                                                   str(Path(model.path) / "loss.png")])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_finetune(init_model: Input[Model], splits: Input[Dataset], preset: str, config: dict,
                   model: Output[Model], metrics: Output[Metrics], finetune_steps: int = 0, finetune_lr: float = 0.0):
    """Supervised fine-tune (response tokens, top layers) from the reinforce stage's model."""
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import log_metrics, preset_config, training_dir
    from components.train import stages
    from components.train.config import FinetuneConfig

    cfg = preset_config(config, preset, {"finetune.steps": finetune_steps, "finetune.lr": finetune_lr})
    ft = from_dict(FinetuneConfig, cfg["finetune"], "finetune")
    with training_dir(model, "train-finetune", init_model, splits, ft) as work:
        summary = stages.run_finetune(ft, str(Path(init_model.path) / "model"), splits.path, work)
    log_metrics(metrics, summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_stages(base_model: Input[Model], reinforce_model: Input[Model], finetune_model: Input[Model],
                    splits: Input[Dataset], preset: str, config: dict, report: Output[HTML],
                    metrics: Output[Metrics]):
    """Held-out accuracy and perplexity of the three stages' models, a table and a plot."""
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import html_page, log_metrics, preset_config
    from components.train import evaluate
    from components.train.config import EvaluateConfig

    import tempfile

    out = Path(tempfile.mkdtemp()) / "evaluate"  # the table and plot go into the HTML artifact
    result = evaluate.run(from_dict(EvaluateConfig, preset_config(config, preset)["evaluate"], "evaluate"),
                          {name: str(Path(m.path) / "model") for name, m in
                           (("base", base_model), ("reinforce", reinforce_model), ("finetune", finetune_model))},
                          splits.path, out)
    log_metrics(metrics, result)
    html_page(report.path, "stages", [str(out / "stages.png")], pre=(out / "stages.md").read_text(encoding="utf-8"))
