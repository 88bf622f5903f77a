"""Heuristic quality filters (Gopher / C4 style) on the prompt and the response.

    from components.data.quality import quality_issue
    quality_issue(row, FilterConfig())  # None, or (code, human detail) of the first failed rule

Rules, in the order they are checked (the code is what the filter's reason reads after
`quality:`; the detail names the field and the measured value against its bound):

| code             | prompt | response | rule |
|------------------|--------|----------|------|
| mojibake         | yes    | yes      | U+FFFD replacement characters or UTF-8-read-as-Latin-1 pairs (`Ã©`, `â€`) |
| char_repeat      | yes    | yes      | a run of one character longer than `max_char_repeat` |
| too_few_words    | yes    | -        | fewer than `min_words` words |
| too_many_words   | yes    | -        | more than `max_words` words |
| low_alpha_words  | yes    | -        | alphabetic words / non-numeric words < `min_alpha_word_fraction` |
| symbols          | yes    | yes      | symbol characters / all non-space characters > `max_symbol_fraction` |

Departures from Gopher, for math data: a word that is a number (`48`, `$12`, `3.5`, `20%`,
`1,000`) is neutral in the alphabetic-word fraction (neither counted for nor against), since
word problems are number-heavy; a word is alphabetic when, stripped of surrounding punctuation,
it is letters only (apostrophes and hyphens inside allowed), which is stricter than Gopher's
"holds one letter" and is what catches random-character strings like `st5@%m&s`. Arithmetic
signs and currency (`+ - * / = < > % $`) count as punctuation, not symbols, so GSM8K's
`<<48/2=24>>` marks and `#### 72` lines pass. Word-count bounds apply to the prompt only: an
empty response is the validator's business, and a plain-text corpus has none.
None reads as "" everywhere.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from components.data.config import FilterConfig

_MOJIBAKE = re.compile("[\u00c2\u00c3\u00e2][\u0080-\u00bf]|\u00e2\u20ac|\ufffd")
_NUMERIC_WORD = re.compile(r"^[$€£(]*+[-+]?\d[\d,.:/]*+(?:%|k|st|nd|rd|th|s)?[).,;:!?]*+$", re.IGNORECASE)
"""Possessive, so that a word like `1.,.,.,` (no repeat run) costs linear time, not quadratic."""
_ALPHA_WORD = re.compile(r"^\W*[^\W\d_]+(?:['’\-][^\W\d_]+)*\W*$")
PUNCTUATION = set(".,;:!?'\"()[]{}-–—‘’“”/\\+*=<>%$€£#…×÷")
"""Characters that count neither as symbols nor as letters (text and arithmetic punctuation)."""


def longest_run(text: str) -> tuple[int, str]:
    """(length, character) of the longest run of one repeated non-space character."""
    best, best_ch, run, prev = 0, "", 0, None
    for ch in text:
        run = run + 1 if ch == prev else 1
        prev = ch
        if run > best and not ch.isspace():
            best, best_ch = run, ch
    return best, best_ch


def symbol_fraction(text: str) -> float:
    """Fraction of non-space characters that are not letters, digits or PUNCTUATION."""
    chars = [ch for ch in text if not ch.isspace()]
    if not chars:
        return 0.0
    symbols = sum(1 for ch in chars if not (ch.isalnum() or ch in PUNCTUATION))
    return symbols / len(chars)


def alpha_word_fraction(words: list[str]) -> float:
    """Alphabetic words over words that are not numbers (1.0 when all words are numbers)."""
    counted = [w for w in words if not _NUMERIC_WORD.match(w)]
    if not counted:
        return 1.0
    return sum(1 for w in counted if _ALPHA_WORD.match(w)) / len(counted)


def _char_checks(field: str, text: str, cfg: FilterConfig) -> tuple[str, str] | None:
    bad = _MOJIBAKE.findall(text)
    if bad:
        return "mojibake", f"{field}: {len(bad)} replacement or mis-decoded character(s), e.g. {bad[0]!r}"
    run, ch = longest_run(text)
    if run > cfg.max_char_repeat:
        return "char_repeat", f"{field}: {run} repeats of {ch!r} in a row (max {cfg.max_char_repeat})"
    return None


def _symbol_check(field: str, text: str, cfg: FilterConfig) -> tuple[str, str] | None:
    frac = symbol_fraction(text)
    if frac > cfg.max_symbol_fraction:
        return "symbols", f"{field}: {frac:.0%} symbol characters (max {cfg.max_symbol_fraction:.0%})"
    return None


def quality_issue(row: dict[str, Any], cfg: FilterConfig) -> tuple[str, str] | None:
    """The first quality rule `row` fails, as (code, detail), or None when it passes all."""
    prompt = unicodedata.normalize("NFKC", row.get("prompt") or "")
    response = unicodedata.normalize("NFKC", row.get("response") or "")
    for field, text in (("prompt", prompt), ("response", response)):
        issue = _char_checks(field, text, cfg)
        if issue:
            return issue
    words = prompt.split()
    if len(words) < cfg.min_words:
        return "too_few_words", f"prompt: {len(words)} word(s) (min {cfg.min_words})"
    if len(words) > cfg.max_words:
        return "too_many_words", f"prompt: {len(words)} words (max {cfg.max_words})"
    frac = alpha_word_fraction(words)
    if frac < cfg.min_alpha_word_fraction:
        return "low_alpha_words", (f"prompt: {frac:.0%} of the non-numeric words are alphabetic "
                                   f"(min {cfg.min_alpha_word_fraction:.0%})")
    for field, text in (("prompt", prompt), ("response", response)):
        issue = _symbol_check(field, text, cfg)
        if issue:
            return issue
    return None
