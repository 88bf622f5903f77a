"""Kubeflow Pipelines component of the registry step: the KFP interface and nothing else.

(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(model: Input[Model], check: Input[Artifact], registry_config: dict, report: Output[HTML],
            metrics: Output[Metrics]):
    """registry.promote: register the checked INT8 model in the GTO registry and move it to
    staging if it beats production on the gate metrics (a refusal is reported, not an error).
    It changes the registry, a side effect: the pipeline turns caching off for it."""
    import json
    import tempfile
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import html_page, log_metrics
    from components.registry import release
    from components.registry.config import RegistryConfig

    cfg = from_dict(RegistryConfig, registry_config, "registry")
    folder = Path(model.path)
    load = Path(check.path) / "loadtest.json"
    out = Path(tempfile.mkdtemp())  # promotion.md goes into the HTML artifact
    result = release.run(cfg, folder / "model", json.loads((folder / "metrics.json").read_text()),
                         json.loads((Path(check.path) / "check.json").read_text()),
                         {"rows": json.loads(load.read_text())} if load.is_file() else None, out)
    log_metrics(metrics, {"promoted": result["promoted"], **result["metrics"]})
    html_page(report.path, "registry", [], pre=(out / "promotion.md").read_text())
