"""Raw data from a file (JSONL, Parquet, CSV, plain text) to canonical rows, checked strictly.

    distillery data ingest ../shared/data/gsm8k/train.jsonl --out data/ingested

The first step of a pipeline run on real data (the built-in sample data comes from `generate`
instead): every record goes through the loader's field mapping, and a malformed file stops the
run here with an error that names the file and line, before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, finish
from components.config import to_dict
from components.data.config import SourceConfig
from components.data.load import load_rows, write_jsonl

RAW = "raw.jsonl"


def run(input_path: str | os.PathLike, cfg: SourceConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write `<out_dir>/raw.jsonl` (canonical rows) and its manifest, all or nothing."""
    rows = load_rows(input_path, cfg)
    metrics = {"rows": len(rows)}
    with atomic_dir(Path(out_dir), inputs=(input_path,)) as tmp:
        write_jsonl(tmp / RAW, rows)
        finish(tmp, "ingest", {"source": input_path}, to_dict(cfg), metrics, {"rows": tmp / RAW})
    return metrics
