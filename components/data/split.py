"""Deterministic train / val / test split by a hash of the row id.

    distillery split data/filtered/kept.jsonl --out data/split

A row's split depends only on its id and the salt: sha256(salt + id) read as a number in [0, 1)
is compared with the fractions. Adding, removing or reordering other rows never moves a row
from one split to another, and rows that share an id (content-hash ids of identical rows)
always land together, so duplicates cannot leak from train into test.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, finish
from components.config import to_dict
from components.data.config import SplitConfig
from components.data.load import DataError, Row, load_canonical, write_jsonl

SPLITS = ("train", "val", "test")


def bucket(row_id: str, salt: str) -> float:
    """The row's position in [0, 1): the first 8 bytes of sha256(salt \\0 id)."""
    digest = hashlib.sha256(f"{salt}\0{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(row_id: str, cfg: SplitConfig) -> str:
    u = bucket(row_id, cfg.salt)
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def split_rows(rows: list[Row], cfg: SplitConfig) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {name: [] for name in SPLITS}
    for row in rows:
        out[assign(str(row["id"]), cfg)].append(row)
    return out


def run(input_path: str | os.PathLike, cfg: SplitConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The `split` step: train.jsonl, val.jsonl, test.jsonl and the manifest, all or nothing."""
    rows = load_canonical(input_path)  # the filter's weights and any kept columns travel on
    parts = split_rows(rows, cfg)
    metrics: dict[str, Any] = {f"{name}_rows": len(part) for name, part in parts.items()}
    metrics["rows"] = len(rows)
    with atomic_dir(Path(out_dir), inputs=(input_path,)) as tmp:
        for name, part in parts.items():
            write_jsonl(tmp / f"{name}.jsonl", part)
        finish(tmp, "split", {"rows": input_path}, to_dict(cfg), metrics,
               {name: tmp / f"{name}.jsonl" for name in SPLITS})
    return metrics


def read_split(folder: str | os.PathLike, name: str) -> list[Row]:
    """The rows of one file of a split folder (`train.jsonl`, `val.jsonl`, `test.jsonl`); an empty
    file is no rows, a missing one a DataError that says what the folder should be."""
    path = Path(folder) / name
    if not path.is_file():
        raise DataError(f"{path}: missing; give the split step's output folder (train.jsonl, val.jsonl)")
    return load_canonical(path) if path.stat().st_size else []
