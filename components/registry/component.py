"""Kubeflow Pipelines component of the registry step: the KFP interface and nothing else.

It takes every preset's registry section (`config`, a compile-time constant), the run's
`preset` and the run form's gate values, which are laid over it as given (their defaults are the
compiled values), resolved by `preset_config` (components/kfp_io.py).
(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(model: Input[Model], check: Input[Artifact], preset: str, config: dict, gate_metric: str,
            gate_min_gain: float, gate_minimums: dict, report: Output[HTML], metrics: Output[Metrics]):
    """registry.promote: register the checked INT8 model in the GTO registry and move it to
    staging if it beats production on the gate metrics (a refusal is reported, not an error).
    It changes the registry, a side effect: the pipeline turns caching off for it."""
    import tempfile
    from pathlib import Path

    from components.config import from_dict
    from components.kfp_io import html_page, log_metrics, preset_config
    from components.registry import release
    from components.registry.config import RegistryConfig

    gate = {"registry.gate.metric": gate_metric, "registry.gate.min_gain": gate_min_gain,
            "registry.gate.minimums": gate_minimums}
    cfg = from_dict(RegistryConfig, preset_config(config, preset, exact=gate)["registry"], "registry")
    folder = Path(model.path)
    load = Path(check.path) / "loadtest.json"
    out = Path(tempfile.mkdtemp())  # promotion.md goes into the HTML artifact
    result = release.run_files(cfg, folder / "model", Path(check.path) / "check.json", out,
                               folder / "metrics.json", load if load.is_file() else None)
    log_metrics(metrics, {"promoted": result["promoted"], **result["metrics"]})
    html_page(report.path, "registry", [], pre=(out / "promotion.md").read_text())
