"""The filter step with real datasketch, scikit-learn and cleanlab: duplicates, quality, the
equation reader, label noise against the generator's ground truth, weights, the step's files."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.data.config import FilterConfig, GenerateConfig, SourceConfig
from components.data.dedup import normalize
from components.data.equations import equations, evaluate, final_value
from components.data.filter import filter_rows, run
from components.data.generate import generate
from components.data.load import DataError, load_rows, write_jsonl
from components.data.noise import corrupt_step, label_of, normalized_weights
from components.data.quality import quality_issue

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
QUIET = {"progress": False}


def problem(i: int, **over) -> dict:
    """A small, distinct, correct word problem (its numbers depend on i)."""
    a, b = 10 + i, 3 + i % 7
    base = {"id": f"r{i}", "prompt": f"Mira keeps {a} shells in a jar on the shelf of her room, and on a walk along "
                                     f"the beach she finds {b} more. How many shells does Mira have now?",
            "response": f"Mira has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} shells.\n#### {a + b}",
            "answer": str(a + b)}
    return {**base, **over}


def check_partition(rows, kept, removed):
    assert len(kept) + len(removed) == len(rows)
    assert Counter(r["id"] for r in kept + removed) == Counter(r["id"] for r in rows)
    for r in kept:
        assert isinstance(r["weight"], float)
    for r in removed:
        assert r["reason"] and r["detail"]


# ---- duplicates --------------------------------------------------------------------------------

def test_normalize():
    assert normalize("  ＡＢＣ\t Déjà\n\nVU ") == "abc déjà vu"
    assert normalize(None) == ""


def test_exact_duplicates_differing_in_case_and_space_are_removed_first_kept():
    rows = [problem(i) for i in range(6)]
    copy = {**rows[2], "id": "copy", "prompt": "  " + rows[2]["prompt"].upper().replace(" ", "   ") + "\n"}
    rows.insert(4, copy)
    kept, removed, report = filter_rows(rows, FilterConfig(label_noise=False), **QUIET)
    check_partition(rows, kept, removed)
    assert [(r["id"], r["reason"]) for r in removed] == [("copy", "exact_duplicate")]
    assert "r2" in removed[0]["detail"]
    assert report["removed_by_reason"] == {"exact_duplicate": 1}


def test_near_duplicate_with_one_word_changed_is_removed_and_names_its_original():
    # one changed word replaces up to 3 of the n - 2 shingles: Jaccard (n - 5) / (n + 1), above
    # the default 0.7 from about 19 words on (GSM8K questions have about 45)
    rows = [problem(i) for i in range(6)]
    near = {**rows[1], "id": "near", "prompt": rows[1]["prompt"].replace("finds", "collects")}
    rows.append(near)
    kept, removed, _ = filter_rows(rows, FilterConfig(label_noise=False), **QUIET)
    check_partition(rows, kept, removed)
    assert [(r["id"], r["reason"]) for r in removed] == [("near", "near_duplicate")]
    assert "r1" in removed[0]["detail"]


def test_same_template_with_other_numbers_is_not_a_near_duplicate():
    rows = [problem(1), {**problem(1), "id": "other", "prompt": problem(1)["prompt"].replace("11", "12")}]
    kept, removed, _ = filter_rows(rows, FilterConfig(label_noise=False), **QUIET)
    assert removed == []
    kept, removed, _ = filter_rows(rows, FilterConfig(label_noise=False, near_dup_same_numbers=False), **QUIET)
    assert [r["id"] for r in removed] == ["other"]


def test_distinct_template_problems_are_kept():
    rows, _ = generate(GenerateConfig(rows=500, noise=0.0))
    kept, removed, report = filter_rows(rows, FilterConfig(), **QUIET)
    check_partition(rows, kept, removed)
    assert len(removed) / len(rows) < 0.03, report["removed_by_reason"]


# ---- quality -----------------------------------------------------------------------------------

GARBAGE = {
    "random characters": ("st5@%m&s p$rlnv9tv rqpdgs!r4m1t&v~%2h fwg%j1mq8n7@s$0zlt rfw^3 hzg6", "low_alpha_words"),
    "repeated character": ("?" * 60, "char_repeat"),
    "repeat inside text": ("How many apples does Ann have nowwwwwwwwwwwwwww?", "char_repeat"),
    "mojibake": ("Ann h\u00c3\u00a4s 12 \u00c3\u00a9pples. How many apples does she have?", "mojibake"),
    "replacement character": ("Ann has 12 \ufffd apples. How many apples does she have?", "mojibake"),
    "too short": ("Why?", "too_few_words"),
    "symbols": ("Ann~~ has@@ 12 apples|| and~~ buys^^ 3 more{{ apples}}. How~~ many|| now@@?", "symbols"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_quality_catches_garbage(name):
    prompt, code = GARBAGE[name]
    issue = quality_issue({"prompt": prompt, "response": "12 + 3 = <<12+3=15>>15\n#### 15"}, FilterConfig())
    assert issue is not None and issue[0] == code, issue
    assert issue[1].startswith("prompt:")


def test_quality_passes_ordinary_math_text_and_checks_the_response():
    good = {"prompt": "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes (about 83%) of it.",
            "response": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10", "answer": "10"}
    assert quality_issue(good, FilterConfig()) is None
    assert quality_issue({**good, "response": "ok " + "=" * 30}, FilterConfig())[0] == "char_repeat"
    assert quality_issue({"prompt": None, "response": None}, FilterConfig())[0] == "too_few_words"


# ---- the equation reader -----------------------------------------------------------------------

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def written(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.2f}"


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10_000), b=st.integers(1, 500), op=st.sampled_from(sorted(OPS)),
       mark=st.booleans(), delta=st.integers(-50, 50).filter(lambda d: d != 0))
def test_equations_are_read_and_checked(a, b, op, mark, delta):
    c = written(OPS[op](a, b))
    text = f"So {a} {op} {b} = <<{a}{op}{b}={c}>>{c} things." if mark else f"So {a} {op} {b} = {c} things."
    (eq,) = equations(text)
    assert eq.mark is mark and eq.correct
    assert evaluate(f"{a} {op} {b}") == pytest.approx(OPS[op](a, b))
    wrong = written(float(c) + delta)
    text = f"<<{a}{op}{b}={wrong}>>{wrong}" if mark else f"then {a} {op} {b} = {wrong}."
    (eq,) = equations(text)
    assert not eq.correct


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/x()=.%$<> a")), max_size=40))
def test_reader_never_fails_on_any_text(text):
    value = evaluate(text)
    assert value is None or isinstance(value, float)
    equations(text)


def test_reader_edge_cases():
    assert evaluate("2 * (3 + 4)") == 14 and evaluate("2^3") == 8 and evaluate("50%*40") == 20
    assert evaluate("560//10") == 56 and evaluate("4 hours/day * 125 watts") == 500
    assert evaluate("1/0") is None and evaluate("__import__('os')") is None and evaluate("9**9**9") is None
    assert [e.written for e in equations("She earned 0.2 x 50 = $<<0.2*50=10>>10.")] == ["10"]
    assert equations("He works M + 4 + 2 = 8 hours, and 2/12 = 1/6 of it") == ()
    assert final_value("a\n#### 1,250")[0] == 1250 and final_value("no marker")[0] is None


def test_step_corruption_is_carried_to_the_answer():
    row = {"id": "x", "prompt": "Rosa has 23 books. Rosa buys 22 more. Each is swapped for 5. How many?",
           "response": "Rosa adds 22: 23 + 22 = <<23+22=45>>45.\nRosa multiplies by 5: 45 * 5 = <<45*5=225>>225.\n"
                       "#### 225", "answer": "225"}
    for seed in range(20):
        bad = corrupt_step(row, 225.0, random.Random(seed))
        if bad is None:
            continue
        eqs = equations(bad["response"])
        assert sum(not e.correct for e in eqs) == 1
        assert label_of(bad) == final_value(bad["response"])[0] == eqs[-1].result != 225


# ---- label noise and weights -------------------------------------------------------------------

def test_label_noise_finds_wrong_answers():
    rows, truth = generate(GenerateConfig(rows=2000, noise=0.2, seed=0, noise_kinds={"wrong_answer": 1.0}))
    kept, removed, report = filter_rows(rows, FilterConfig(), **QUIET)
    check_partition(rows, kept, removed)
    wrong = {t["id"] for t in truth if t["kind"] == "wrong_answer"}
    flagged = {r["id"] for r in removed if r["reason"] == "label_noise"}
    recall, precision = len(flagged & wrong) / len(wrong), len(flagged & wrong) / max(1, len(flagged))
    print(f"label noise: recall {recall:.3f}, precision {precision:.3f}, {report['label_noise']}")
    assert recall >= 0.8 and precision >= 0.9
    weights = [r["weight"] for r in kept]
    assert sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-9)
    assert min(weights) >= FilterConfig().min_weight


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=60), st.floats(0.01, 1.0))
def test_normalized_weights_mean_one_and_floor(p, floor):
    w = normalized_weights(p, floor)
    assert len(w) == len(p)
    assert sum(w) / len(w) == pytest.approx(1.0, abs=1e-9)
    assert min(w) >= floor - 1e-12


def test_same_seed_same_result_and_validator_faults_do_not_crash():
    rows, _ = generate(GenerateConfig(rows=600, noise=0.3, seed=3))
    rows += [{"id": "n1", "prompt": None, "response": None, "answer": None},
             {"id": "n2", "prompt": "Plain text without any answer in it at all.", "response": "", "answer": None},
             {"id": "n3", "prompt": "Ann has 3 apples. How many?", "response": "3\n#### three", "answer": "N/A"}]
    first = filter_rows(rows, FilterConfig(seed=5), **QUIET)
    second = filter_rows(rows, FilterConfig(seed=5), **QUIET)
    check_partition(rows, first[0], first[1])
    assert [(r["id"], r["weight"]) for r in first[0]] == [(r["id"], r["weight"]) for r in second[0]]
    assert [(r["id"], r["reason"]) for r in first[1]] == [(r["id"], r["reason"]) for r in second[1]]


# ---- the step's files --------------------------------------------------------------------------

def test_run_writes_every_file(tmp_path):
    rows, _ = generate(GenerateConfig(rows=300, noise=0.2, seed=1))
    write_jsonl(tmp_path / "clean.jsonl", rows)
    metrics = run(tmp_path / "clean.jsonl", FilterConfig(), tmp_path / "filtered")
    out = tmp_path / "filtered"
    names = {"kept.jsonl", "removed.jsonl", "report.json", "report.html", "removal_reasons.png",
             "manifest.json", "metrics.json"}
    assert names <= {p.name for p in out.iterdir()}
    kept = load_rows(out / "kept.jsonl", SourceConfig(keep_columns=["weight"]))
    removed = [json.loads(line) for line in (out / "removed.jsonl").read_text().splitlines()]
    check_partition(rows, kept, removed)
    assert metrics["rows_kept"] == len(kept) and metrics["rows"] == 300
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == "filter" and manifest["params"]["near_dup_threshold"] == 0.7
    assert set(manifest["outputs"]) >= {"kept.jsonl", "removed.jsonl", "report.html"}
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "removal_reasons.png").read_bytes()[:4] == b"\x89PNG"


def test_run_on_malformed_input_leaves_nothing(tmp_path):
    bad = tmp_path / "clean.jsonl"
    bad.write_text(json.dumps(problem(1)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"clean.jsonl:2"):
        run(bad, FilterConfig(), tmp_path / "filtered")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl"]


# ---- real data ---------------------------------------------------------------------------------

def test_gsm8k_is_mostly_kept():
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K not found at {path} (a fresh clone has no ../shared/data)")
    rows = load_rows(path, SourceConfig(fields={"prompt": "question", "response": "answer"}))[:1000]
    kept, removed, report = filter_rows(rows, FilterConfig(), **QUIET)
    check_partition(rows, kept, removed)
    print(f"GSM8K: {len(removed)} of {len(rows)} removed: {report['removed_by_reason']}")
    assert len(removed) / len(rows) < 0.10
