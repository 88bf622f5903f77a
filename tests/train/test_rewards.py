"""Rule-based rewards: answers in many spellings, missing tags, huge numbers, Unicode digits,
empty output, several answers; a property test for the answer parser."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from components.train.rewards import (MAX_DIGITS, accuracy_reward, format_reward, parse_answer,
                                      reference_answer)

GOOD = "Ann starts with 3.\nAnn adds 2: 3 + 2 = <<3+2=5>>5.\n#### 5"


@pytest.mark.parametrize("written, value", [
    ("5", "5"), (" 1,000 ", "1000"), ("1000.0", "1000"), ("-3.50", "-3.5"), ("$12", "12"), ("7.", "7"),
    ("1e3", "1000"), ("٤٢", "42"), ("４２", "42"), ("४२", "42"), ("+8", "8"), (".5", "0.5"),
])
def test_answers_in_many_spellings(written, value):
    assert parse_answer(written) == Decimal(value)


@pytest.mark.parametrize("written", [
    None, "", "   ", "five", "5 apples", "5 6", "--5", "1e999999999", "9" * (MAX_DIGITS + 1), "nan", "inf",
    "Infinity", "0x10", "1_000", "²",
])
def test_non_answers(written):
    assert parse_answer(written) is None


def test_a_huge_number_is_compared_exactly_not_as_a_float():
    big = "9" * 40
    assert accuracy_reward(f"work\n#### {big}", big) == 1.0
    assert accuracy_reward(f"work\n#### {big[:-1]}8", big) == 0.0  # equal as floats, not as numbers


@pytest.mark.parametrize("text, fmt, acc", [
    (GOOD, 1.0, 1.0),
    (GOOD.replace("#### 5", "#### 6"), 1.0, 0.0),  # well formed, wrong
    (GOOD.replace("#### 5", "#### ٥"), 1.0, 1.0),  # Arabic-Indic five
    ("#### 5", 0.0, 1.0),  # no reasoning before the answer
    ("Ann adds 2: 3 + 2 = 5. #### 5", 0.0, 1.0),  # the marker not on its own line
    ("Ann adds 2: 3 + 2 = 5.\nThe answer is 5", 0.0, 0.0),  # missing tag
    ("Ann adds 2.\n#### 5\n#### 6", 0.0, 0.0),  # several answers: no credit
    ("Ann adds 2.\n#### 5\n#### 5", 0.0, 0.0),
    ("Ann adds 2.\n#### 5\nand more text", 0.0, 1.0),  # trailing text: answer right, format wrong
    ("Ann adds 2.\n#### five", 0.0, 0.0),
    ("", 0.0, 0.0),
    (None, 0.0, 0.0),
])
def test_format_and_accuracy(text, fmt, acc):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, "5") == acc


def test_other_marker_and_missing_reference():
    assert format_reward("work\nANSWER: 5", marker="ANSWER:") == 1.0
    assert accuracy_reward("work\nANSWER: 5", "5", marker="ANSWER:") == 1.0
    assert accuracy_reward(GOOD, None) == 0.0
    assert reference_answer({"answer": 7}) == "7"
    assert reference_answer({"answer": None, "response": "x\n#### 12"}) == "12"
    assert reference_answer({"response": "no marker"}) is None


@given(st.text(max_size=80))
def test_parser_never_raises_and_rewards_are_binary(text):
    value = parse_answer(text)
    assert value is None or value.is_finite()
    assert format_reward(text) in (0.0, 1.0) and accuracy_reward(text, "3") in (0.0, 1.0)


@given(st.integers(min_value=-10**30, max_value=10**30))
def test_every_integer_round_trips_with_and_without_thousands_separators(n):
    assert parse_answer(str(n)) == n
    assert parse_answer(f"{n:,}") == n
    assert accuracy_reward(f"reasoning\n#### {n:,}", str(n)) == 1.0


# ---- pass@k (components/train/evaluate.py) -------------------------------------------------------

from itertools import combinations  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from components.train.evaluate import pass_at_k  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 9), data=st.data())
def test_pass_at_k_is_the_chance_that_k_of_n_samples_hold_a_correct_one(n, data):
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    samples = [True] * c + [False] * (n - c)
    draws = list(combinations(range(n), k))
    exact = sum(any(samples[i] for i in d) for d in draws) / len(draws)
    assert abs(pass_at_k(n, c, k) - exact) < 1e-12
    assert abs(pass_at_k(n, c, 1) - c / n) < 1e-12
    if k < n:
        assert pass_at_k(n, c, k) <= pass_at_k(n, c, k + 1) + 1e-12


def test_pass_at_k_refuses_impossible_counts():
    import pytest

    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=40))
def test_mcnemar_counts_discordant_pairs_and_its_p_is_the_exact_two_sided_binomial(pairs):
    from components.train.evaluate import mcnemar

    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    only_a, only_b, p = mcnemar(a, b)
    assert only_a == sum(x and not y for x, y in pairs) and only_b == sum(y and not x for x, y in pairs)
    n = only_a + only_b
    # every split of the n discordant problems at least as lopsided as the one seen, under p = 1/2
    extreme = abs(only_a - only_b)
    exact = sum(math.comb(n, i) for i in range(n + 1) if abs(2 * i - n) >= extreme) / 2 ** n
    assert abs(p - min(1.0, exact)) < 1e-12
    assert mcnemar(b, a) == (only_b, only_a, p)  # symmetric
    assert 0 < p <= 1


def test_mcnemar_known_values_and_refusal():
    import pytest

    from components.train.evaluate import mcnemar

    assert mcnemar([True] * 10, [False] * 10) == (10, 0, 2 / 2 ** 10)
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="same problems"):
        mcnemar([True], [True, False])
