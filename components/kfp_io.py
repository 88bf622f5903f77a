"""Small helpers for component bodies: step metrics into a KFP Metrics artifact."""

from __future__ import annotations

from typing import Any


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Log every numeric (and boolean, as 0/1) value of a step's metrics dict."""
    for key, value in values.items():
        if isinstance(value, bool):
            metrics.log_metric(key, int(value))
        elif isinstance(value, (int, float)):
            metrics.log_metric(key, value)
