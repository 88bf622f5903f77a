"""Small helpers for component bodies: the run's step configs (preset + run-form overrides), step
metrics into a KFP Metrics artifact, HTML artifacts, the training steps' working folder."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

from components.config import ConfigError

def preset_config(config: dict[str, Any], preset: str, overrides: dict[str, Any] | None = None,
                  exact: dict[str, Any] | None = None) -> dict[str, Any]:
    """The step sections this run uses: `config` holds every preset's sections, compiled into the
    pipeline ({preset: {section: values}}), so the run form's `preset` picks one at run time; then
    each of `overrides` ("train.steps" -> the form's value) goes over it unless it is 0, "" or {}
    (keep the preset's), and each of `exact` as given (the gate: its form value is the value).
    An unknown preset is a ConfigError listing the known ones; the caller's `from_dict` checks
    the rest strictly."""
    import copy

    if preset not in config:
        raise ConfigError(f"preset: unknown preset {preset!r}; known: {', '.join(config) or 'none'}")
    sections = copy.deepcopy(config[preset])
    chosen = {key: value for key, value in (overrides or {}).items() if not _keeps_preset(value)}
    for dotted, value in {**chosen, **(exact or {})}.items():
        *parents, leaf = dotted.split(".")
        node = sections
        for key in parents:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[leaf] = value
    return sections


def _keeps_preset(value: Any) -> bool:
    """0, "", {} (the run form's defaults) and None: keep the preset's value."""
    return not isinstance(value, bool) and (value is None or value in (0, "") or value == {})


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Log every finite numeric (and boolean, as 0/1) value of a step's metrics dict, and write
    them as JSON at the artifact's path: KFP keeps Metrics in the artifact's metadata and writes no
    file, and kfp.local's cache takes an output whose file is missing for a miss, so without one a
    step would never be served from the cache."""
    import json
    from pathlib import Path

    for key, value in values.items():
        if isinstance(value, bool):
            metrics.log_metric(key, int(value))
        elif isinstance(value, (int, float)) and math.isfinite(value):  # KFP's protobuf has no NaN
            metrics.log_metric(key, value)
    path = Path(metrics.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metrics.metadata), indent=1) + "\n", encoding="utf-8")


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


CHECKPOINT_ENV = "DISTILLERY_CHECKPOINT_DIR"
"""Where training steps keep their working folders: the mounted checkpoint volume on a cluster
(pipelines/pipeline.py sets it), `<out>/checkpoints` in a local run (pipelines/local.py)."""


@contextlib.contextmanager
def training_dir(artifact: Any, *inputs: Any) -> Iterator[str]:
    """Where a training step trains: its output artifact's folder, or, when $DISTILLERY_CHECKPOINT_DIR
    names a checkpoint folder (a cluster's volume, a local run's `<out>/checkpoints`), a folder there
    named by the step's `inputs` (`training_key`): a retried pod, or a local run started again,
    trains with the same inputs in the same folder and so resumes from the last checkpoint. The
    finished folder is then copied into the artifact and removed."""
    import os
    import shutil
    from pathlib import Path

    volume = os.environ.get(CHECKPOINT_ENV)
    if not volume:
        yield artifact.path
        return
    work = Path(volume) / training_key(*inputs)
    yield str(work)
    shutil.copytree(work, artifact.path, dirs_exist_ok=True)
    shutil.rmtree(work)


def training_key(*inputs: Any) -> str:
    """The working folder's name for a training step's `inputs`: its input artifacts' URIs and its
    typed configs (as the run resolved them, so the same settings give the same key whether they
    came from the preset or the run form), hashed."""
    import dataclasses
    import hashlib
    import json

    plain = [dataclasses.asdict(i) if dataclasses.is_dataclass(i) and not isinstance(i, type)
             else getattr(i, "uri", i) for i in inputs]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
