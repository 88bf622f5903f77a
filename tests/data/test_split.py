"""The split by a hash of the row id: deterministic, stable, proportional."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from components.data.config import SplitConfig
from components.data.load import write_jsonl
from components.data.split import assign, run, split_rows

CFG = SplitConfig(val_fraction=0.1, test_fraction=0.2)


def _rows(ids):
    return [{"id": i, "prompt": "p", "response": "r", "answer": "1"} for i in ids]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), unique=True, max_size=60),
       st.lists(st.text(min_size=1, max_size=12), max_size=60))
def test_a_row_never_moves_when_other_rows_change(ids, others):
    alone = {r["id"]: name for name, part in split_rows(_rows(ids), CFG).items() for r in part}
    mixed = {r["id"]: name for name, part in split_rows(_rows(others + ids[::-1]), CFG).items() for r in part}
    assert all(mixed[i] == alone[i] for i in ids)


def test_fractions_are_close_and_salt_changes_the_draw():
    ids = [f"id-{i}" for i in range(20000)]
    parts = split_rows(_rows(ids), CFG)
    assert abs(len(parts["test"]) / 20000 - 0.2) < 0.015
    assert abs(len(parts["val"]) / 20000 - 0.1) < 0.015
    other = SplitConfig(val_fraction=0.1, test_fraction=0.2, salt="other")
    moved = sum(assign(i, CFG) != assign(i, other) for i in ids[:2000])
    assert moved > 500


def test_run_keeps_weights_and_writes_all_splits(tmp_path):
    src = tmp_path / "kept.jsonl"
    write_jsonl(src, [{**r, "weight": 0.5 + k / 100} for k, r in enumerate(_rows([f"x{k}" for k in range(100)]))])
    metrics = run(src, CFG, tmp_path / "split")
    got = []
    for name in ("train", "val", "test"):
        got += [json.loads(line) for line in open(tmp_path / "split" / f"{name}.jsonl")]
    assert len(got) == metrics["rows"] == 100
    assert all("weight" in r for r in got)
    assert json.loads((tmp_path / "split" / "manifest.json").read_text())["step"] == "split"
