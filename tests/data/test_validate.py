"""The validation gate with real Great Expectations: reasons per row, the gate, Data Docs."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.data.config import SourceConfig, ValidateConfig
from components.data.equations import close, final_value, parse_number
from components.data.load import load_rows, write_jsonl
from components.data.validate import GateFailed, check_mark, report_html, run, validate_rows


def row(i: int, **over) -> dict:
    base = {"id": f"r{i}", "prompt": f"Ann has {i} apples and buys 2 more. How many now?",
            "response": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2}", "answer": str(i + 2)}
    return {**base, **over}


FAULTS = {
    "null_prompt": {"prompt": None},
    "blank_response": {"response": "   \n "},
    "length_prompt": {"prompt": "short"},
    "charset_prompt": {"prompt": "Ann has \ufffd apples \x07 and more. How many now?"},
    "answer_not_number": {"answer": "twelve"},
    "no_final_answer": {"response": "3 + 2 = 5"},
    "final_not_number": {"response": "3 + 2 = 5\n#### five"},
    "answer_disagrees": {"answer": "999"},
    "null_answer": {"answer": None},
}


@pytest.mark.parametrize("reason", sorted(FAULTS))
def test_each_fault_is_quarantined_with_its_reason(reason):
    rows = [row(i) for i in range(20)] + [row(99, **FAULTS[reason])]
    result = validate_rows(rows, ValidateConfig(data_docs=False))
    assert result.gate_passed
    assert [q["id"] for q in result.quarantined] == ["r99"]
    assert reason in result.quarantined[0]["reasons"]
    assert len(result.clean) == 20


def test_the_reports_marks_agree_with_its_counts():
    """A row-level expectation that passes the batch but quarantines rows is not shown as met."""
    rows = [row(i) for i in range(20)] + [row(98, answer="999"), row(99, prompt=None)]
    report = validate_rows(rows, ValidateConfig(data_docs=False)).report
    marks = {e["description"]: (check_mark(e), e["unexpected"]) for e in report["expectations"]}
    assert marks["answer equals the response's final answer"] == ("⚠", 1)
    assert marks["prompt is not null"] == ("⚠", 1)
    assert marks["response is not null"] == ("✔", 0)
    for e in report["expectations"]:
        assert (check_mark(e) == "✔") == (e["success"] and not e["unexpected"])
    page = report_html(report)
    assert page.count("<tr><td>⚠</td>") == sum(1 for e in report["expectations"] if e["unexpected"])
    worse = rows + [row(i, answer="999") for i in range(50, 53)]  # 4 of 25 disagree: over `mostly` (95 %)
    failed = validate_rows(worse, ValidateConfig(data_docs=False, max_quarantine_fraction=0.05)).report
    assert {e["description"]: check_mark(e) for e in failed["expectations"] if not e["success"]} == {
        "answer equals the response's final answer": "✘"}


@pytest.mark.parametrize("final", ["$12", "12 apples", "12.", "1,2"])
def test_disagreement_is_caught_whatever_the_number_looks_like(final):
    rows = [row(i) for i in range(10)] + [row(50, response=f"x\n#### {final}", answer="99")]
    result = validate_rows(rows, ValidateConfig(data_docs=False))
    assert [q["id"] for q in result.quarantined] == ["r50"]
    assert result.quarantined[0]["reasons"] == ["answer_disagrees"]


def test_the_source_answer_marker_is_used():
    rows = [row(i, response=f"{i} + 2 = {i + 2}. The answer is {i + 2}") for i in range(10)]
    assert validate_rows(rows, ValidateConfig(data_docs=False), marker="The answer is").quarantined == []
    failed = validate_rows(rows, ValidateConfig(data_docs=False, max_quarantine_fraction=1.0))
    assert {r for q in failed.quarantined for r in q["reasons"]} == {"no_final_answer"}


def test_well_formed_numbers_pass():
    rows = [row(1, answer="1,234", response="x\n#### 1,234"), row(2, answer="-3.5", response="y\n#### -3.5"),
            row(3, answer=" 7 ", response="z\n####7")]
    result = validate_rows(rows, ValidateConfig(data_docs=False))
    assert result.quarantined == []


@pytest.mark.parametrize("cfg, fragment", [
    (ValidateConfig(max_duplicate_fraction=0.1, data_docs=False), "duplicate prompts"),
    (ValidateConfig(mean_prompt_chars=[500, 1000], data_docs=False), "mean prompt length"),
    (ValidateConfig(min_rows=100, data_docs=False), "at least 100 rows"),
    (ValidateConfig(max_quarantine_fraction=0.04, data_docs=False), "quarantined"),
])
def test_batch_level_failures_fail_the_gate(cfg, fragment):
    rows = [row(i) for i in range(16)] + [row(0, id=f"dup{i}") for i in range(4)] + [row(50, answer="x")]
    result = validate_rows(rows, cfg)
    assert not result.gate_passed
    assert any(fragment in f for f in result.report["failed"]), result.report["failed"]


text_or_none = st.one_of(st.none(), st.text(max_size=60))
number_text = st.one_of(st.integers(-10**6, 10**6).map(str), st.sampled_from(["1,000", "$12", "3.50", "20%", "x"]))
responses = st.one_of(text_or_none, st.builds(lambda body, n: f"{body}\n#### {n}", st.text(max_size=30), number_text))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({"prompt": text_or_none, "response": responses,
                                       "answer": st.one_of(text_or_none, number_text)}),
                min_size=1, max_size=25))
def test_clean_plus_quarantined_is_the_input(records):
    rows = [{"id": f"h{i}", **r} for i, r in enumerate(records)]
    result = validate_rows(rows, ValidateConfig(data_docs=False, max_quarantine_fraction=1.0))
    ids = [r["id"] for r in result.clean] + [r["id"] for r in result.quarantined]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert all(q["reasons"] for q in result.quarantined)
    for r in result.clean:  # what passes is what the gate promises
        assert r["prompt"] and r["prompt"].strip() and r["answer"] is not None
        final = final_value(r["response"])[0]
        assert final is not None and close(final, parse_number(r["answer"]))


def test_run_writes_outputs_docs_and_manifest(tmp_path):
    src = tmp_path / "rows.jsonl"
    write_jsonl(src, [row(i) for i in range(30)] + [row(77, answer="N/A")])
    out = tmp_path / "validated"
    metrics = run(src, ValidateConfig(), out)
    assert metrics["clean"] == 30 and metrics["quarantined"] == 1
    assert (out / "data_docs" / "index.html").is_file()
    html = (out / "report.html").read_text()
    assert "PASSED" in html and "answer_not_number" in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "validate" and len(manifest["inputs"]["rows"]["sha256"]) == 64
    assert {o["file"] for o in manifest["outputs"].values()} == {"clean.jsonl", "quarantined.jsonl", "report.json"}
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_gate_failure_writes_no_output(tmp_path):
    src = tmp_path / "rows.jsonl"
    write_jsonl(src, [row(i, answer="?") for i in range(10)])
    out = tmp_path / "validated"
    with pytest.raises(GateFailed, match="rows.jsonl: validation gate failed"):
        run(src, ValidateConfig(), out)
    assert not out.exists()
    assert (tmp_path / "validated.rejected" / "report.json").is_file()


def test_gsm8k_passes_validation_through_the_field_mapping(shared_data):
    rows = load_rows(shared_data / "gsm8k" / "train.jsonl", SourceConfig(fields={"prompt": "question",
                                                                                 "response": "answer"}))
    result = validate_rows(rows, ValidateConfig(data_docs=False))
    assert result.gate_passed, result.report["failed"]
    assert len(rows) == 7473
    assert len(result.quarantined) <= 0.01 * len(rows)
