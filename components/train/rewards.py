"""Rule-based rewards for reinforcement with verifiable answers (DeepSeek-R1's accuracy + format).

    format_reward("Ann adds 2: 3 + 2 = 5.\n#### 5")            -> 1.0
    accuracy_reward("Ann adds 2: 3 + 2 = 5.\n#### 5", "5")      -> 1.0

The agreed format is the one the training data teaches (GSM8K's): some reasoning, then one final
line `<marker> <number>` (marker "####" by default) and nothing after it. DeepSeek-R1 asks for
`<think>...</think><answer>...</answer>`; the marker line plays the answer tag here, because the
base stage learnt it from the data and a reward the policy cannot reach teaches nothing.

- format: 1.0 when the completion is non-empty reasoning, then exactly one marker, at the start of
  a line, followed by a number and nothing else; else 0.0.
- accuracy: 1.0 when the completion has exactly one marker and the number after it equals the
  reference answer; else 0.0. Several markers (hedging between answers) earn nothing.

Numbers are compared exactly as decimals ("1,000" = "1000.0" = "1e3"), after mapping any Unicode
decimal digit to ASCII ("٤٢" and "４２" read 42); a number written with more than MAX_DIGITS
characters is no answer (a reward must not cost unbounded time).
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation

MAX_DIGITS = 64
_NUMBER = re.compile(r"[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")


def to_ascii_digits(text: str) -> str:
    """Every Unicode decimal digit (Arabic-Indic, fullwidth, Devanagari...) as its ASCII digit."""
    return "".join(str(unicodedata.decimal(c)) if not c.isascii() and unicodedata.decimal(c, None) is not None
                   else c for c in text)


def parse_answer(text: str | None) -> Decimal | None:
    """A written answer ("1,234", "-3.50", "$12", "7.") as an exact Decimal; None when it is not
    exactly one number."""
    if text is None:
        return None
    t = to_ascii_digits(text).strip().replace(",", "")
    t = t.removeprefix("$").removesuffix(".").strip()
    if not t or len(t) > MAX_DIGITS or not _NUMBER.fullmatch(t):
        return None
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    if not value.is_finite() or abs(value.adjusted()) > MAX_DIGITS:  # 1e999999999 is no answer
        return None
    return value


def split_completion(text: str, marker: str = "####") -> tuple[str, list[str]]:
    """(reasoning before the first marker, the text after each marker)."""
    parts = text.split(marker)
    return parts[0], parts[1:]


def format_reward(text: str | None, marker: str = "####") -> float:
    if not text:
        return 0.0
    reasoning, answers = split_completion(text, marker)
    if len(answers) != 1 or not reasoning.strip() or not reasoning.endswith("\n"):
        return 0.0
    return 1.0 if parse_answer(answers[0]) is not None and "\n" not in answers[0].strip() else 0.0


def accuracy_reward(text: str | None, reference: str | Decimal | None, marker: str = "####") -> float:
    if not text or reference is None:
        return 0.0
    _, answers = split_completion(text, marker)
    if len(answers) != 1:
        return 0.0
    got = parse_answer(answers[0].strip().split("\n", 1)[0])
    want = reference if isinstance(reference, Decimal) else parse_answer(str(reference))
    return 1.0 if got is not None and want is not None and got == want else 0.0


def reference_answer(row: dict, marker: str = "####") -> str | None:
    """The row's verifiable answer: its `answer` field, else the number after the response's marker."""
    from components.data.load import final_answer

    answer = row.get("answer")
    if answer not in (None, ""):
        return str(answer)
    return final_answer(row.get("response"), marker)
