"""Typed config of the model registry (the `registry` section of params.yaml).

    registry:
      root: runs/registry          # a git repository of its own, made by `Registry.init`
      name: distillery-lm
      gate:
        metric: accuracy           # must beat production by more than min_gain ...
        min_gain: 0.0
        max_regression: {format_rate: 0.01, p95_ms: 25.0}   # ... and lose at most this elsewhere
        minimums: {accuracy: 0.05}                          # always, the first model too
        maximums: {p95_ms: 500.0}

Every field has its default here and a docstring under it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from components.config import require

STAGES = ("staging", "production")

# GTO's artifact name rule (gto/constants.py `name`) without '/': the name is a folder name too.
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$")

LOWER_IS_BETTER = ("p50_ms", "p95_ms", "p99_ms", "latency_ms", "size_bytes", "params", "loss", "perplexity")


@dataclass
class GateConfig:
    """When a candidate may be promoted: it must beat production and stay within bounds."""

    metric: str = "accuracy"
    """The metric a candidate must improve over the production model (see lower_is_better for
    its direction)."""
    min_gain: float = 0.0
    """Improvement required on `metric`: candidate - production > min_gain (strictly; for a
    lower-is-better metric production - candidate > min_gain). 0.0: any strict improvement."""
    max_regression: dict[str, float] = field(default_factory=lambda: {"format_rate": 0.01})
    """Other metrics may be worse than production's by at most this much (absolute units of the
    metric: 0.01 of format_rate, 25.0 ms of p95_ms). A metric named here must be in both
    metrics files, or the gate fails."""
    minimums: dict[str, float] = field(default_factory=dict)
    """Absolute floors, e.g. {accuracy: 0.05}: candidate >= value. Checked on every promotion,
    also of the first model, when there is no production model to compare with."""
    maximums: dict[str, float] = field(default_factory=dict)
    """Absolute ceilings, e.g. {p95_ms: 500.0}: candidate <= value. Checked on every promotion."""
    lower_is_better: list[str] = field(default_factory=lambda: list(LOWER_IS_BETTER))
    """Metrics where smaller is better (latency, size, loss); every other metric is higher-is-better."""
    require_check: bool = True
    """Staging needs the serve.check report (check.json) to say passed: true."""

    def check(self) -> None:
        require(bool(self.metric), "metric: must name a metric of metrics.json")
        require(self.min_gain >= 0, f"min_gain: must be >= 0, got {self.min_gain}")
        for key, value in self.max_regression.items():
            require(value >= 0, f"max_regression.{key}: must be >= 0, got {value}")
        for key, low in self.minimums.items():
            high = self.maximums.get(key)
            require(high is None or low <= high, f"minimums.{key}: {low} is above maximums.{key} {high}")

    def better_when_lower(self, metric: str) -> bool:
        return metric in self.lower_is_better


@dataclass
class RegistryConfig:
    """The GTO model registry: where it lives, the model's name, and the promotion gate."""

    root: str = "runs/registry"
    """The registry's git repository (relative to the working folder). Versions live under
    <root>/models/<name>/<version>/, stages are GTO git tags in it."""
    name: str = "distillery-lm"
    """The model's artifact name: tags <name>@v0.0.1 (versions), <name>#production#3 (stages)."""
    gate: GateConfig = field(default_factory=GateConfig)
    """The promotion gate (thresholds)."""
    production_requires_staging: bool = True
    """Production takes only the version that is in staging now (staging, then production);
    the gate is checked again against the production model of that moment."""
    allowed_suffixes: list[str] = field(default_factory=lambda: [".json", ".safetensors", ".txt", ".md", ".jinja", ".model"])
    """File types a model folder may hold; anything else (a .pt, .bin, .pkl, .npy) is refused.
    Files are also read: pickle bytes or a zip with a .pkl inside are refused whatever the name."""
    max_artifact_bytes: int = 64 << 30
    """Largest model folder or archive content accepted (sum of file sizes), 64 GiB."""
    lock_timeout_s: float = 120.0
    """How long a change waits for another process's change to the same registry to finish."""

    def check(self) -> None:
        require(bool(NAME_RE.match(self.name)),
                f"name: {self.name!r} must be letters, digits, '-' or '_', starting and ending with a letter or digit")
        require(bool(self.root), "root: must name a folder")
        for suffix in self.allowed_suffixes:
            require(suffix.startswith(".") and len(suffix) > 1, f"allowed_suffixes: {suffix!r} must look like '.json'")
        require(self.max_artifact_bytes > 0, "max_artifact_bytes: must be positive")
        require(self.lock_timeout_s >= 0, "lock_timeout_s: must be >= 0")
