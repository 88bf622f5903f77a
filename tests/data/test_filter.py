"""The filter step with real datasketch, scikit-learn and cleanlab: duplicates, quality, the
equation reader, label noise against the generator's ground truth, weights, the step's files."""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from components.data.config import FilterConfig, GenerateConfig, SourceConfig
from components.data.dedup import normalize, number_signature
from components.data.equations import MAX_SCAN_CHARS, equations, evaluate, final_value, stated_values
from components.data.filter import filter_rows, run
from components.data.generate import generate
from components.data.load import DataError, load_rows, write_jsonl
from components.data.noise import corrupt_step, features, label_of, normalized_weights
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
    given = {r["id"]: r for r in rows}
    for r in kept:
        assert isinstance(r["weight"], float)
        assert {k: v for k, v in r.items() if k != "weight"} == {k: v for k, v in given[r["id"]].items() if k != "weight"}
    for r in removed:
        assert r["reason"] and r["detail"]
        assert {k: v for k, v in r.items() if k not in ("reason", "detail")} == given[r["id"]]


# ---- duplicates --------------------------------------------------------------------------------

def test_normalize():
    assert normalize("  ＡＢＣ\t Déjà\n\nVU ") == "abc déjà vu"
    assert normalize(None) == ""
    assert number_signature("Liam has 1,200 stamps and 3 boxes of 3") == ("1200", "3", "3")


def test_extra_columns_are_carried_through_kept_and_removed_rows():
    rows = [{**problem(i), "source": f"s{i}", "weight": 0.25, "meta": {"k": i}} for i in range(6)]
    rows.append({**rows[3], "id": "copy", "source": "other"})
    kept, removed, _ = filter_rows(rows, FilterConfig(), **QUIET)
    check_partition(rows, kept, removed)
    assert [(r["id"], r["source"], r["meta"]) for r in removed] == [("copy", "other", {"k": 3})]
    assert [r["source"] for r in kept] == [f"s{i}" for i in range(6)]
    assert all(r["weight"] == 1.0 for r in kept)  # an incoming weight is replaced (no model: < 20 judged rows)


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
    exact = OPS[op](a, b)
    # documented tolerance: a whole result of a division may be rounded down or up (`= 17` boxes)
    assume(not (op == "/" and "." not in wrong and math.floor(exact) <= float(wrong) <= math.ceil(exact)))
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
    assert equations("We have: 21/7 = 90/x, and 6:00+18 hours = 00:00, so 600 x 30 = 18 000 watts") == ()
    assert final_value("a\n#### 1,250")[0] == 1250 and final_value("no marker")[0] is None
    assert evaluate("1 1/2 * 4") == 6 and evaluate("12 x 1 and 1/4") == 15 and evaluate("25 / 1/3") == 75
    assert evaluate("2,430 – 1,250") == 1180


# what GSM8K writes, each read as a right equation (these were false label-noise flags)
GSM8K_STYLE = {
    "2 segments / 8 segments * 100% = 25%": ("25", 25),
    "8 pushups / 40 exercises * 100% = 20%": ("20", 20),
    "15 trucks / 90 vehicles * 100% = 16.66...%, which rounds up to 17%": ("16.66", 16.66),
    "And the length of the patio is 4*x = 4*10 = 40 feet.": ("40", 40),
    "in 1800 seconds, Julia could download 1800/(1/4) = 1800 * 4 = 7200 songs": ("7200", 7200),
    "Hunter could eat 1 1/2 times, so 1 1/2 * 4 = 6 hotdogs": ("6", 6),
    "He can bake 25 / 1/3 = 75 cupcakes": ("75", 75),
    "so she can fill 100 / 6 = 16 pages": ("16", 16),
    "then 7+9+1+2 = 19 and 4 minutes * 60 seconds/minute + 30 seconds = 240 seconds + 30 seconds = 270": ("19", 19),
}


@pytest.mark.parametrize("text", sorted(GSM8K_STYLE))
def test_reader_reads_gsm8k_notation(text):
    eqs = equations(text)
    assert eqs and all(e.correct for e in eqs), [(e.expr, e.written, e.value) for e in eqs]
    assert GSM8K_STYLE[text] in [(e.written, e.result) for e in eqs]


def test_wrong_equations_stay_wrong():
    for text in ("so 2 * 8 = 24 hours", "17 / 3 = 7 groups", "15 / 90 * 100% = 17.5%", "3 1/2 * 2 = 8",
                 "so x = 4 * 10 = 45 hours"):
        assert [e.correct for e in equations(text)] == [False], text


def test_stated_values_are_what_follows_an_equals_sign():
    assert stated_values("so 3/2x = 120 and x = 80 while y = 2 * 4 = 8, and z = 1/6") == (120, 80, 8)
    assert stated_values("at 6:00 = 6:48 PM, 18 000 = 18 000") == ()


ADVERSARIAL = ["1 apples + " * 9100, "1 + " * 25000, "(" * 100_000, "((1 " * 25000, "1" + " " * 100_000 + "x",
               "1234567890" * 10_000, "1 = " * 25000, "<<" + "1+" * 50_000 + "=3>>", "1/ " * 33_000,
               "$1 apples/day * " * 6250, "1 1/2 x " * 12_500]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=[t[:12] for t in ADVERSARIAL])
def test_reader_is_linear_on_adversarial_text(text):
    # the old nested regex took 3 s on 22 KB of "1 apples + " and 47 s on 88 KB
    assert len(text) >= 99_000
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("reader too slow")))
    signal.alarm(5)
    try:
        t = time.perf_counter()
        equations(text + " ")  # a string not seen before: no cache
        stated_values(text)
        evaluate(text[:MAX_SCAN_CHARS])
        features(text, text, "3")
        quality_issue({"prompt": text, "response": text}, FilterConfig())
        elapsed = time.perf_counter() - t
    finally:
        signal.alarm(0)
    assert elapsed < 1.0, elapsed


def test_reader_reads_only_the_first_max_scan_chars():
    assert equations("2 + 2 = 4 " + " " * MAX_SCAN_CHARS) != ()
    assert equations(" " * MAX_SCAN_CHARS + "2 + 2 = 4") == ()


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
    noise = report["label_noise"]
    assert noise["refit"] and noise["dropped"] + noise["flagged_kept_downweighted"] == noise["flagged"]
    assert report["flagged_kept_downweighted"] == noise["flagged_kept_downweighted"]


def test_flagged_rows_above_drop_below_are_kept_down_weighted():
    rows, truth = generate(GenerateConfig(rows=600, noise=0.2, seed=4, noise_kinds={"wrong_answer": 1.0}))
    wrong = {t["id"] for t in truth if t["noise"]}
    runs = {d: filter_rows(rows, FilterConfig(drop_below=d), **QUIET) for d in (0.0, 0.2, 1.0)}
    flagged = runs[1.0][2]["label_noise"]["flagged"]
    assert flagged > 0.8 * len(wrong) and len(runs[1.0][1]) == flagged
    kept, removed, report = runs[0.0]
    assert removed == [] and report["flagged_kept_downweighted"] == flagged
    by_id = {r["id"]: r["weight"] for r in kept}
    assert max(by_id[i] for i in wrong) < 0.5 < min(w for i, w in by_id.items() if i not in wrong)
    example = report["label_noise"]["flagged_kept_examples"][0]
    assert example["id"] in wrong and example["detail"].startswith("p(answer right) = ")
    kept, removed, report = runs[0.2]
    ps = [float(r["detail"].split("= ")[1].split(":")[0]) for r in removed]
    assert len(removed) + report["flagged_kept_downweighted"] == flagged and max(ps) < 0.2 + 0.005


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

def test_gsm8k_is_kept():
    # GSM8K's answers are curated: what label_noise removes is (mostly) a false positive. Measured
    # on all 7,473 train rows: 1.36 % removed as label noise, 1.65 % flagged (0.28 % kept,
    # down-weighted), 1 near-duplicate; before the reader learned GSM8K's notation, 3.7 %.
    path = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K not found at {path} (a fresh clone has no ../shared/data)")
    rows = load_rows(path, SourceConfig(fields={"prompt": "question", "response": "answer"}))
    kept, removed, report = filter_rows(rows, FilterConfig(), **QUIET)
    check_partition(rows, kept, removed)
    print(f"GSM8K: {len(removed)} of {len(rows)} removed: {report['removed_by_reason']}")
    reasons = Counter(r["reason"] for r in removed)
    assert reasons["label_noise"] / len(rows) < 0.02
    assert report["label_noise"]["flagged"] / len(rows) < 0.025
    assert (len(removed) - reasons["label_noise"]) / len(rows) < 0.005
