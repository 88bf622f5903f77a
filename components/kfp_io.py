"""Small helpers for component bodies: step metrics into a KFP Metrics artifact, HTML artifacts,
the training steps' working folder."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator


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


@contextlib.contextmanager
def training_dir(artifact: Any) -> Iterator[str]:
    """Where a training step trains: its output artifact's folder, or, on a cluster (the pipeline
    sets $DISTILLERY_CHECKPOINT_DIR to the mounted checkpoint volume), a folder on that volume
    named by the artifact's URI, which KFP keeps across the retries of one task, so a retried pod
    resumes from the last checkpoint; the finished folder is then copied into the artifact and
    removed from the volume."""
    import hashlib
    import os
    import shutil
    from pathlib import Path

    volume = os.environ.get("DISTILLERY_CHECKPOINT_DIR")
    if not volume:
        yield artifact.path
        return
    work = Path(volume) / hashlib.sha256(artifact.uri.encode()).hexdigest()[:16]
    yield str(work)
    shutil.copytree(work, artifact.path, dirs_exist_ok=True)
    shutil.rmtree(work)
