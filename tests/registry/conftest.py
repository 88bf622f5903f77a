"""Fixtures of the registry tests: a fresh registry and a factory of tiny model folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_helpers import make_model

from components.registry import Registry
from components.registry.config import GateConfig, RegistryConfig

@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    cfg = RegistryConfig(root=str(tmp_path / "reg"), name="lm",
                         gate=GateConfig(metric="accuracy", min_gain=0.0, max_regression={"format_rate": 0.01}))
    return Registry.init(tmp_path / "reg", cfg, actor="Ada Lovelace <ada@example.com>")


@pytest.fixture
def model_factory(tmp_path: Path):
    counter = iter(range(10_000))

    def make(metrics: dict | None = None, check: dict | None = None, seed: int | None = None) -> Path:
        n = next(counter)
        return make_model(tmp_path / "models" / f"m{n}", n if seed is None else seed, metrics, check)

    return make

