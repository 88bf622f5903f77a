"""The synthetic sample set: deterministic bytes, the noise plan, correct clean rows, its truth file."""

from __future__ import annotations

import functools
import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.artifacts import sha256_file
from components.data.config import GenerateConfig
from components.data.generate import (
    FRIENDS,
    HELD_OUT_KINDS,
    NOISE_KINDS,
    PHRASES,
    generate,
    manifest_path,
    run,
    truth_path,
)
from components.data.load import final_answer, load_rows

MARK = re.compile(r"<<(-?\d+)([-+*/])(-?\d+)=(-?\d+)>>(-?\d+)")


@pytest.fixture(scope="module")
def sample():
    cfg = GenerateConfig(rows=600, noise=0.3, seed=7)
    rows, truth = generate(cfg)
    return cfg, rows, truth


def normalized(text: str | None) -> str:
    return " ".join((text or "").split()).lower()


def apply(left: int, op: str, right: int) -> int | None:
    """The exact result of a calculator mark; None for a division that does not come out even."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left // right if right and left % right == 0 else None


@functools.lru_cache(maxsize=None)
def sentence_patterns(name: str, item: str) -> list[tuple[str, re.Pattern]]:
    """(op, regex) for every phrasing of the story's operations, with its name and item filled in."""
    friend = "|".join(map(re.escape, FRIENDS))
    out = []
    for op, templates in PHRASES.items():
        for t in templates:
            pattern = re.escape(t).replace(r"\{n\}", r"(\d+)").replace(r"\{name\}", re.escape(name))
            pattern = pattern.replace(r"\{item\}", re.escape(item)).replace(r"\{friend\}", f"(?:{friend})")
            out.append((op, re.compile(pattern, re.IGNORECASE)))
    return out


def sentence_ops(prompt: str) -> list[tuple[str, int]]:
    """(op, operand) of each sentence of a generated story, in order."""
    name, _, item = re.match(r"(\w+) has (\d+) (\w+)\. ", prompt).groups()
    body = prompt[prompt.index(". ") + 2: prompt.rindex(f" How many {item} does {name} have now?")]
    out, pos = [], 0
    while pos < len(body):
        pos += body[pos] == " "
        found = [(op, m) for op, pattern in sentence_patterns(name, item) if (m := pattern.match(body, pos))]
        assert found, f"unparsed story at {body[pos:]!r}"
        op, m = found[0]
        out.append((op, int(m.group(1))))
        pos = m.end()
    return out


def solve(prompt: str) -> int:
    """The answer of a generated problem, read from its story alone (independent of the response)."""
    cur = int(re.match(r"\w+ has (\d+) ", prompt).group(1))
    for op, n in sentence_ops(prompt):
        cur = apply(cur, op, n)
    return cur


# ---- determinism -------------------------------------------------------------------------------

def test_same_seed_gives_the_same_bytes(tmp_path):
    cfg = GenerateConfig(rows=300, noise=0.25, seed=11)
    run(cfg, tmp_path / "a" / "raw.jsonl")
    run(cfg, tmp_path / "b" / "raw.jsonl")
    for name in ("raw.jsonl", "raw.truth.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    man_a = json.loads((tmp_path / "a" / "raw.manifest.json").read_text())
    man_b = json.loads((tmp_path / "b" / "raw.manifest.json").read_text())
    assert man_a["outputs"] == man_b["outputs"] and man_a["metrics"] == man_b["metrics"]


def test_a_different_seed_gives_different_rows(tmp_path):
    run(GenerateConfig(rows=200, seed=1), tmp_path / "a.jsonl")
    run(GenerateConfig(rows=200, seed=2), tmp_path / "b.jsonl")
    a = [json.loads(x)["prompt"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x)["prompt"] for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert a != b and len(set(a) & set(b)) < len(a) // 2


# ---- the plan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rows, noise", [(1, 0.0), (10, 0.0), (7, 0.5), (600, 0.3), (1000, 0.9), (333, 0.15)])
def test_row_and_noise_counts(rows, noise):
    out, truth = generate(GenerateConfig(rows=rows, noise=noise, seed=3))
    assert len(out) == len(truth) == rows
    assert sum(t["noise"] for t in truth) == round(rows * noise)


def test_truth_has_one_entry_per_row_with_the_same_ids(sample):
    cfg, rows, truth = sample
    assert [r["id"] for r in rows] == [t["id"] for t in truth]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(re.fullmatch(r"syn-7-\d{6}", r["id"]) for r in rows)
    assert all(list(r) == ["id", "prompt", "response", "answer"] for r in rows)
    for t in truth:
        assert (t["kind"] in NOISE_KINDS and t["detail"]) if t["noise"] else (t["kind"] is None and t["detail"] is None)


def test_noise_kinds_are_only_the_configured_ones():
    cfg = GenerateConfig(rows=400, noise=0.5, seed=5,
                         noise_kinds={"garbage": 1.0, "exact_duplicate": 2.0, "empty": 0.0})
    _, truth = generate(cfg)
    kinds = Counter(t["kind"] for t in truth if t["noise"])
    assert set(kinds) == {"garbage", "exact_duplicate"}
    assert sum(kinds.values()) == 200
    assert kinds["exact_duplicate"] > kinds["garbage"]  # weights 2:1 over 200 draws


def test_default_config_uses_every_kind_but_the_held_out_ones(sample):
    _, _, truth = sample
    assert set(t["kind"] for t in truth if t["noise"]) == set(NOISE_KINDS) - set(HELD_OUT_KINDS)
    assert not set(HELD_OUT_KINDS) & set(GenerateConfig().noise_kinds)
    GenerateConfig(noise_kinds={k: 1.0 for k in HELD_OUT_KINDS}).check()  # selectable


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kinds", [None, {"exact_duplicate": 1.0}, {"near_duplicate": 1.0}])
def test_tiny_sets_with_the_most_noise_still_generate(rows, kinds):
    cfg = GenerateConfig(rows=rows, noise=0.9, **({"noise_kinds": kinds} if kinds else {}))
    for seed in range(8):
        cfg.seed = seed
        out, truth = generate(cfg)
        assert len(out) == rows
        assert sum(t["noise"] for t in truth) == min(round(rows * 0.9), rows - 1)  # a duplicate needs an original


# ---- clean rows are correct --------------------------------------------------------------------

def test_clean_rows_are_verifiably_correct(sample):
    _, rows, truth = sample
    clean = [r for r, t in zip(rows, truth) if not t["noise"]]
    assert len(clean) == 420
    for r in clean:
        marks = MARK.findall(r["response"])
        assert marks, r["response"]
        for left, op, right, result, shown in marks:
            assert apply(int(left), op, int(right)) == int(result) == int(shown), (r["id"], left, op, right, result)
        # the marks chain: each step starts from the previous result
        assert all(int(marks[i][0]) == int(marks[i - 1][3]) for i in range(1, len(marks)))
        assert r["answer"] == marks[-1][3] == final_answer(r["response"])
        assert r["response"].splitlines()[-1] == f"#### {r['answer']}"
        assert int(r["answer"]) == solve(r["prompt"]) > 0


@pytest.mark.parametrize("max_number", [3, 7, 20, 60, 500])
def test_max_number_bounds_the_starting_count_and_the_added_amounts(max_number):
    rows, truth = generate(GenerateConfig(rows=300, noise=0.0, seed=3, max_number=max_number))
    starts, added = [], []
    for r in rows:
        marks = MARK.findall(r["response"])
        starts.append(int(marks[0][0]))
        added += [int(m[2]) for m in marks if m[1] == "+"]
        for left, op, right, result, _ in marks:
            assert apply(int(left), op, int(right)) == int(result)
        assert int(r["answer"]) == solve(r["prompt"])
    assert 2 <= min(starts) and max(starts) <= max_number
    assert added and max(added) <= max(1, max_number * 5 // 6, max_number // 3)
    if max_number >= 20:  # the whole range is used
        assert max(starts) > 0.8 * max_number


def test_clean_prompts_are_distinct(sample):
    _, rows, truth = sample
    prompts = [r["prompt"] for r, t in zip(rows, truth) if not t["noise"]]
    assert len(set(prompts)) == len(prompts)


# ---- noise rows are what the truth says --------------------------------------------------------

def rows_of(sample, kind):
    _, rows, truth = sample
    return [(i, r, t) for i, (r, t) in enumerate(zip(rows, truth)) if t["kind"] == kind]


def test_duplicates_come_after_their_original(sample):
    _, rows, _ = sample
    exact = rows_of(sample, "exact_duplicate")
    assert exact
    for i, r, _ in exact:
        earlier = {normalized(x["prompt"]) for x in rows[:i]}
        assert normalized(r["prompt"]) in earlier, r
    for i, r, _ in rows_of(sample, "near_duplicate"):
        earlier = [x for x in rows[:i] if x["response"] == r["response"] and x["prompt"] != r["prompt"]]
        assert earlier, r


def test_wrong_answer_rows_are_wrong(sample):
    rows = rows_of(sample, "wrong_answer")
    assert rows
    for _, r, t in rows:
        assert int(r["answer"]) != solve(r["prompt"]), (r, t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wrong_answers_stay_wrong_in_long_chains(seed):
    # a miscomputed step followed by a floor division, or another problem's answer, can land on
    # the true answer by chance; the truth file must not then call the row wrong
    rows, truth = generate(GenerateConfig(rows=1500, noise=0.5, seed=seed, max_ops=6,
                                          noise_kinds={"wrong_answer": 1.0}))
    for r, t in zip(rows, truth):
        assert (int(r["answer"]) != solve(r["prompt"])) == t["noise"], (r, t)
        if not t["noise"]:
            assert r["answer"] == final_answer(r["response"])
    assert {t["detail"] for t in truth if t["noise"]} == {
        "final answer changed", "answer of another problem", *(f"step {k} miscomputed" for k in range(1, 7))}


@pytest.mark.parametrize("kind", HELD_OUT_KINDS)
def test_held_out_rows_are_consistent_right_arithmetic_with_a_wrong_answer(kind):
    rows, truth = generate(GenerateConfig(rows=1200, noise=0.5, seed=2, max_ops=6, noise_kinds={kind: 1.0}))
    details = Counter()
    for r, t in zip(rows, truth):
        marks = MARK.findall(r["response"])
        for left, op, right, result, shown in marks:  # every equation is right and exact
            assert apply(int(left), op, int(right)) == int(result) == int(shown) > 0, (r, t)
        assert all(int(marks[i][0]) == int(marks[i - 1][3]) for i in range(1, len(marks)))  # chained
        assert r["answer"] == marks[-1][3] == final_answer(r["response"])  # consistent to the end
        assert (int(r["answer"]) != solve(r["prompt"])) == t["noise"], (r, t)
        if t["noise"]:
            assert t["kind"] == kind
            details[t["detail"].split()[0]] += 1
            story = [int(n) for n in re.findall(r"\d+", r["prompt"])]  # the start, then one per step
            used = [int(marks[0][0])] + [int(m[2]) for m in marks]
            misread = sum(a != b for a, b in zip(story, used))
            ops_story = [op for op, _ in sentence_ops(r["prompt"])]
            ops_used = [m[1] for m in marks]
            if kind == "wrong_operation":  # the story's numbers, one other operation
                assert misread == 0 and sum(a != b for a, b in zip(ops_story, ops_used)) == 1, (r, t)
            else:  # the story's operations, one number copied wrong
                assert misread == 1 and ops_story == ops_used, (r, t)
    assert sum(details.values()) == 600 and len(details) >= 1


def test_broken_field_rows_are_broken(sample):
    for _, r, t in rows_of(sample, "broken_field"):
        marker = final_answer(r["response"])
        assert marker is None or not r["answer"].lstrip("-").isdigit() or marker != r["answer"], (r, t)


def test_empty_rows_are_empty(sample):
    for _, r, _ in rows_of(sample, "empty"):
        assert not (r["prompt"] or "").strip() or not (r["response"] or "").strip()


def test_generated_file_passes_the_strict_loader(tmp_path):
    out = tmp_path / "raw.jsonl"
    run(GenerateConfig(rows=300, seed=4), out)
    rows = load_rows(out)
    assert rows == generate(GenerateConfig(rows=300, seed=4))[0]


# ---- run() -------------------------------------------------------------------------------------

def test_run_writes_rows_truth_and_manifest_and_nothing_else(tmp_path):
    cfg = GenerateConfig(rows=120, noise=0.25, seed=9)
    out = tmp_path / "sample" / "raw.jsonl"
    metrics = run(cfg, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["raw.jsonl", "raw.manifest.json", "raw.truth.jsonl"]
    assert truth_path(out) == out.parent / "raw.truth.jsonl"
    assert manifest_path(out) == out.parent / "raw.manifest.json"

    rows, truth = generate(cfg)
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == rows
    assert [json.loads(x) for x in truth_path(out).read_text(encoding="utf-8").splitlines()] == truth

    man = json.loads(manifest_path(out).read_text())
    assert man["step"] == "generate"
    assert man["params"]["rows"] == 120 and man["params"]["seed"] == 9
    assert man["metrics"] == metrics
    assert metrics["rows"] == 120 and metrics["noise_rows"] == 30
    assert sum(v for k, v in metrics.items() if k.startswith("noise_") and k != "noise_rows") == 30
    assert man["outputs"]["rows"] == {"file": "raw.jsonl", "sha256": sha256_file(out)}
    assert man["outputs"]["truth"] == {"file": "raw.truth.jsonl", "sha256": sha256_file(truth_path(out))}


def test_run_replaces_earlier_output_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "raw.jsonl"
    run(GenerateConfig(rows=50, seed=1), out)
    first = out.read_bytes()
    run(GenerateConfig(rows=60, seed=2), out)
    assert out.read_bytes() != first and len(out.read_text().splitlines()) == 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.jsonl", "raw.manifest.json", "raw.truth.jsonl"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), max_ops=st.integers(2, 3), max_number=st.integers(10, 60))
def test_unseen_problems_never_repeat_an_operand_combination_of_the_training_prompts(seed, max_ops, max_number):
    from components.data.generate import operands, unseen_problems

    cfg = GenerateConfig(rows=300, noise=0.0, seed=seed, max_ops=max_ops, max_number=max_number)
    train, _ = generate(cfg)
    seen = {operands(r["prompt"]) for r in train}
    held = unseen_problems(50, [r["prompt"] for r in train], seed + 1, max_ops, max_number)
    keys = [operands(r["prompt"]) for r in held]
    assert len(held) == 50 and len(set(keys)) == 50 and not seen & set(keys)
    for r in held:  # real problems: the worked response's last line is the answer
        assert r["response"].endswith(f"#### {r['answer']}") and keys[0]


def test_operands_reads_the_story_numbers_in_order_and_unseen_problems_says_when_it_runs_out():
    from components.data.generate import operands, unseen_problems

    assert operands("Ann has 12 pens. Ann buys 3 more pens. Ann sells 14 of the pens. How many?") == (12, 3, 14)
    every = [f"A has {a} x. A buys {b} more x." for a in range(2, 7) for b in range(1, 6)]
    with pytest.raises(ValueError, match="found only"):  # one operation, counts to 6: few combinations exist
        unseen_problems(200, every, 0, max_ops=1, max_number=6, max_tries=5)
