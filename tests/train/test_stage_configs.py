"""The stage configs share one OptimizerConfig, and the engine's TrainConfig of a stage is made
from the stage's own section with nothing fixed on the way (components/train/config.py)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.compress.config import DistillConfig, QuantizeConfig
from components.config import ConfigError, from_dict
from components.train.config import FinetuneConfig, OptimizerConfig, ReinforceConfig, TrainConfig

STAGES = (TrainConfig, ReinforceConfig, FinetuneConfig, DistillConfig)
SHARED = [f.name for f in fields(OptimizerConfig)]


def _documented(cls: type) -> dict[str, str]:
    """field -> the docstring under it, in the class or the nearest base that declares it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                docs[node.target.id] = after.value.value
    return docs


@pytest.mark.parametrize("stage", STAGES + (QuantizeConfig,))
def test_every_stage_config_is_an_optimizer_config_with_a_docstring_per_field(stage):
    assert issubclass(stage, OptimizerConfig) or stage is QuantizeConfig
    if stage is not QuantizeConfig:
        assert SHARED == [f.name for f in fields(stage)][:len(SHARED)]  # flat in its section: `finetune.beta1`
    docs = _documented(stage)
    assert [f.name for f in fields(stage) if not docs.get(f.name, "").strip()] == []


def _shared_values():
    steps = st.integers(1, 10_000)
    return st.builds(dict, steps=steps, lr=st.floats(1e-6, 1.0), min_lr_ratio=st.floats(0, 1),
                     warmup_steps=st.integers(0, 20_000), weight_decay=st.floats(0, 1), beta1=st.floats(0, 0.999),
                     beta2=st.floats(0, 0.9999), grad_clip=st.floats(0, 10), precision=st.sampled_from(["fp32", "bf16"]),
                     zero_stage=st.integers(0, 2), seed=st.integers(0, 2**31), checkpoint_every=st.integers(1, 1000),
                     keep_checkpoints=st.integers(1, 10), eval_every=st.integers(0, 1000),
                     eval_batches=st.integers(1, 16))


@settings(max_examples=150, deadline=None)
@given(stage=st.sampled_from(STAGES[1:]), values=_shared_values(), micro=st.integers(2, 64), accum=st.integers(1, 8))
def test_a_later_stages_engine_config_carries_every_value_of_its_section(stage, values, micro, accum):
    own = {"group_size": micro, "prompts_per_step": accum} if stage is ReinforceConfig else \
        {"micro_batch": micro, "grad_accum": accum}
    if stage is ReinforceConfig:
        values["checkpoint_every"] = values["steps"] = 1  # multiples of updates_per_batch
        own["updates_per_batch"] = 1
    cfg = from_dict(stage, {**values, **own}, stage.__name__)
    engine = cfg.train_config()
    engine.check()  # a valid stage is a valid engine run
    expected = {**values, "warmup_steps": min(values["warmup_steps"], values["steps"] - 1)}
    assert {k: getattr(engine, k) for k in SHARED} == expected
    assert (engine.micro_batch, engine.grad_accum) == (micro, accum)
    assert (engine.pipeline_parallel, engine.tensor_parallel, engine.curriculum_start) == (1, 1, 1.0)


def test_the_engine_configs_of_the_defaults_are_what_the_stages_always_trained_with():
    """The values the stages were trained with before the shared config (the same numbers from the
    same seeds): two checkpoints kept, AdamW (0.9, 0.99), clipping at 1, decay 0.1 (none in GRPO)."""
    assert ReinforceConfig().train_config() == TrainConfig(
        steps=60, micro_batch=8, grad_accum=4, lr=5e-5, warmup_steps=5, precision="fp32", zero_stage=1, seed=0,
        checkpoint_every=20, keep_checkpoints=2, eval_every=20, curriculum_start=1.0, weight_decay=0.0)
    assert FinetuneConfig().train_config() == TrainConfig(
        steps=100, micro_batch=12, grad_accum=1, lr=3e-4, warmup_steps=10, precision="auto", zero_stage=1, seed=0,
        checkpoint_every=50, keep_checkpoints=2, eval_every=50, curriculum_start=1.0)
    assert DistillConfig().train_config() == TrainConfig(
        steps=1000, micro_batch=16, grad_accum=1, lr=1e-3, warmup_steps=20, precision="auto", zero_stage=1, seed=0,
        checkpoint_every=250, keep_checkpoints=2, eval_every=250, curriculum_start=1.0)
    assert QuantizeConfig(qat_steps=40).qat_config() == TrainConfig(
        steps=40, micro_batch=12, lr=5e-5, warmup_steps=10, precision="fp32", seed=0, checkpoint_every=40,
        keep_checkpoints=1, eval_every=0, curriculum_start=1.0)
    assert QuantizeConfig(qat_steps=4).qat_config().warmup_steps == 3
    assert TrainConfig().train_config() == TrainConfig()


@pytest.mark.parametrize("section, key, value, message", [
    ("finetune", "beta2", 1.0, "beta1 and beta2: must be within [0, 1)"),
    ("reinforce", "zero_stage", 3, "zero_stage: must be 0, 1 or 2"),
    ("distill", "keep_checkpoints", 0, "checkpoint_every and keep_checkpoints must be at least 1"),
    ("finetune", "grad_clip", -1.0, "grad_clip: must not be negative"),
    ("quantize", "qat_precision", "int4", "qat_precision: 'int4' is not one of"),
])
def test_a_shared_field_is_checked_in_every_section(section, key, value, message):
    cls = {"finetune": FinetuneConfig, "reinforce": ReinforceConfig, "distill": DistillConfig,
           "quantize": QuantizeConfig}[section]
    with pytest.raises(ConfigError) as err:
        from_dict(cls, {key: value}, section)
    assert str(err.value).startswith(f"{section}") and message in str(err.value), str(err.value)
    cls().check()  # the defaults stay valid
