"""Small helpers for component bodies: step metrics into a KFP Metrics artifact, HTML artifacts."""

from __future__ import annotations

import math
from typing import Any


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Log every finite numeric (and boolean, as 0/1) value of a step's metrics dict."""
    for key, value in values.items():
        if isinstance(value, bool):
            metrics.log_metric(key, int(value))
        elif isinstance(value, (int, float)) and math.isfinite(value):  # KFP's protobuf has no NaN
            metrics.log_metric(key, value)


def html_page(path: str, title: str, pngs: list[str] = (), pre: str = "") -> None:
    """A self-contained HTML artifact at `path`: a title, optional preformatted text, PNGs inlined."""
    import base64
    import html
    from pathlib import Path

    imgs = "".join(f'<img alt="{html.escape(Path(p).stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode("ascii")}">' for p in pngs)
    body = f"<pre>{html.escape(pre)}</pre>" if pre else ""
    Path(path).write_text(f'<!doctype html><meta charset="utf-8"><title>{html.escape(title)}</title>{body}{imgs}',
                          encoding="utf-8")
