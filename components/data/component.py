"""Kubeflow Pipelines components of the data steps: the KFP interface and nothing else.

Each is a lightweight component whose body imports this package (installed in the suite's
image, `base_image`; locally, kfp.local's SubprocessRunner(use_venv=False) runs the body in this
interpreter) and calls the step's one entry point, the same `run` the CLI and DVC call. Each
takes `config`, every preset's sections for the step (a compile-time constant, {preset: {section:
values}}), the run's `preset`, and the run form's flat values that reach it; `preset_config`
(components/kfp_io.py) picks and overlays them, and the step's config class checks the result
strictly. Every output is a folder artifact; metrics go to KFP Metrics, pages to HTML artifacts.
(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""


from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(source_uri: str, preset: str, config: dict, raw: Output[Dataset], metrics: Output[Metrics],
           source_fields: dict = {}, generate_rows: int = 0):
    """Canonical rows: the file at `source_uri` through the field mapping, or, when it is empty,
    the built-in synthetic sample set (with its noise ground truth). The first step: an unknown
    preset fails here."""
    from pathlib import Path

    from components.config import from_dict
    from components.data import generate, ingest
    from components.data.config import GenerateConfig, SourceConfig
    from components.kfp_io import log_metrics, preset_config

    cfg = preset_config(config, preset, {"source.fields": source_fields, "generate.rows": generate_rows})
    source = from_dict(SourceConfig, cfg["source"], "source")
    gen = from_dict(GenerateConfig, cfg["generate"], "generate")  # both checked, whichever runs
    if source_uri:
        result = ingest.run(source_uri, source, raw.path)
    else:
        result = generate.run(gen, Path(raw.path) / ingest.RAW)
    log_metrics(metrics, result)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(raw: Input[Dataset], preset: str, config: dict, clean: Output[Dataset], metrics: Output[Metrics],
             report: Output[HTML], source_fields: dict = {}):
    """The Great Expectations gate; fails the run when the batch fails it, after publishing the
    report that says why."""
    import shutil
    from pathlib import Path

    from components.config import from_dict
    from components.data import validate
    from components.data.config import SourceConfig, ValidateConfig
    from components.kfp_io import log_metrics, preset_config

    sections = preset_config(config, preset, {"source.fields": source_fields})
    cfg = from_dict(ValidateConfig, sections["validate"], "validate")
    source = from_dict(SourceConfig, sections["source"], "source")
    try:
        result = validate.run(Path(raw.path) / "raw.jsonl", cfg, clean.path, source, canonical=True)
    except validate.GateFailed:
        shutil.copyfile(Path(clean.path + ".rejected") / "report.html", report.path)
        raise
    shutil.copyfile(Path(clean.path) / "report.html", report.path)
    log_metrics(metrics, result)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def filter_rows(clean: Input[Dataset], preset: str, config: dict, kept: Output[Dataset], metrics: Output[Metrics],
                report: Output[HTML]):
    """De-duplication, quality filters, label noise by confident learning, sample weights."""
    import shutil
    from pathlib import Path

    from components.config import from_dict
    from components.data import filter as data_filter
    from components.data.config import FilterConfig
    from components.kfp_io import log_metrics, preset_config

    cfg = from_dict(FilterConfig, preset_config(config, preset)["filter"], "filter")
    result = data_filter.run(Path(clean.path) / "clean.jsonl", cfg, kept.path)
    shutil.copyfile(Path(kept.path) / "report.html", report.path)
    log_metrics(metrics, result)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def split(kept: Input[Dataset], preset: str, config: dict, splits: Output[Dataset], metrics: Output[Metrics]):
    """Deterministic train / val / test by a hash of the row id."""
    from pathlib import Path

    from components.config import from_dict
    from components.data import split
    from components.data.config import SplitConfig
    from components.kfp_io import log_metrics, preset_config

    cfg = from_dict(SplitConfig, preset_config(config, preset)["split"], "split")
    result = split.run(Path(kept.path) / "kept.jsonl", cfg, splits.path)
    log_metrics(metrics, result)
