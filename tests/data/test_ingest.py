"""ingest: a raw file through the field mapping, via the CLI as a user would call it."""

from __future__ import annotations

import json

from pipelines.cli import main


def test_gsm8k_ingests_through_the_mapping(shared_data, tmp_path, capsys):
    out = tmp_path / "gsm8k"
    code = main(["data", "ingest", str(shared_data / "gsm8k" / "test.jsonl"), "--out", str(out),
                 "--set", "source.fields={prompt: question, response: answer}"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in open(out / "raw.jsonl")]
    assert len(rows) == 1319
    assert all(set(r) == {"id", "prompt", "response", "answer"} for r in rows)
    assert rows[0]["answer"] == rows[0]["response"].rsplit("####", 1)[1].strip()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["fields"] == {"prompt": "question", "response": "answer"}


def test_csv_with_renamed_columns(tmp_path):
    src = tmp_path / "rows.csv"
    src.write_text('q,a,n\n"Ann has 2, then 3. Sum?","2 + 3 = 5\n#### 5",5\n', encoding="utf-8")
    out = tmp_path / "raw"
    assert main(["data", "ingest", str(src), "--out", str(out),
                 "--set", "source.fields={prompt: q, response: a, answer: n}"]) == 0
    (row,) = [json.loads(line) for line in open(out / "raw.jsonl")]
    assert row["prompt"] == "Ann has 2, then 3. Sum?" and row["answer"] == "5" and row["id"].startswith("h")
