"""Kubeflow Pipelines components of the data steps: the KFP interface and nothing else.

Each is a lightweight component whose body imports this package (installed in the suite's
image, `base_image`; locally, kfp.local's SubprocessRunner(use_venv=False) runs the body in this
interpreter) and calls the step's one entry point, the same `run` the CLI and DVC call. Step
configs arrive as dict parameters and are checked strictly by the step's config class.
Every output is a folder artifact; metrics go to KFP Metrics, pages to HTML artifacts.
(No `from __future__ import annotations` here: KFP reads the annotations as types.)
"""


from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(source_uri: str, source_config: dict, generate_config: dict, raw: Output[Dataset],
           metrics: Output[Metrics]):
    """Canonical rows: the file at `source_uri` through the field mapping, or, when it is empty,
    the built-in synthetic sample set (with its noise ground truth)."""
    from pathlib import Path

    from components.config import from_dict
    from components.data import generate, ingest
    from components.data.config import GenerateConfig, SourceConfig
    from components.kfp_io import log_metrics

    if source_uri:
        result = ingest.run(source_uri, from_dict(SourceConfig, source_config, "source"), raw.path)
    else:
        out = Path(raw.path)
        result = generate.run(from_dict(GenerateConfig, generate_config, "generate"), out / ingest.RAW)
    log_metrics(metrics, result)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(raw: Input[Dataset], source_config: dict, validate_config: dict, clean: Output[Dataset],
             metrics: Output[Metrics], report: Output[HTML]):
    """The Great Expectations gate; fails the run when the batch fails it, after publishing the
    report that says why."""
    import shutil
    from pathlib import Path

    from components.config import from_dict
    from components.data import validate
    from components.data.config import SourceConfig, ValidateConfig
    from components.kfp_io import log_metrics

    cfg = from_dict(ValidateConfig, validate_config, "validate")
    source = from_dict(SourceConfig, source_config, "source")
    try:
        result = validate.run(Path(raw.path) / "raw.jsonl", cfg, clean.path, source, canonical=True)
    except validate.GateFailed:
        shutil.copyfile(Path(clean.path + ".rejected") / "report.html", report.path)
        raise
    shutil.copyfile(Path(clean.path) / "report.html", report.path)
    log_metrics(metrics, result)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def filter_rows(clean: Input[Dataset], filter_config: dict, kept: Output[Dataset], metrics: Output[Metrics],
                report: Output[HTML]):
    """De-duplication, quality filters, label noise by confident learning, sample weights."""
    import shutil
    from pathlib import Path

    from components.config import from_dict
    from components.data import filter as data_filter
    from components.data.config import FilterConfig
    from components.kfp_io import log_metrics

    result = data_filter.run(Path(clean.path) / "clean.jsonl", from_dict(FilterConfig, filter_config, "filter"),
                             kept.path)
    shutil.copyfile(Path(kept.path) / "report.html", report.path)
    log_metrics(metrics, result)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def split(kept: Input[Dataset], split_config: dict, splits: Output[Dataset], metrics: Output[Metrics]):
    """Deterministic train / val / test by a hash of the row id."""
    from pathlib import Path

    from components.config import from_dict
    from components.data import split
    from components.data.config import SplitConfig
    from components.kfp_io import log_metrics

    result = split.run(Path(kept.path) / "kept.jsonl", from_dict(SplitConfig, split_config, "split"), splits.path)
    log_metrics(metrics, result)
