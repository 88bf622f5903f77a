"""Numbers and equations in worked solutions, read without eval(): the verifier's eyes.

    from components.data.equations import equations, evaluate, final_value
    evaluate("48/2")                      # 24.0 (None for anything that is not arithmetic)
    [(e.expr, e.result, e.correct) for e in equations("48/2 = <<48/2=24>>24 clips")]
    final_value("...\\n#### 72")         # (72.0, span of "72")

An equation is either a GSM8K calculator mark `<<48/2=24>>` or plain text `48 / 2 = 24`
(operators + - – * x × / ÷ ^ **, parentheses, `$`, thousands commas, `%` as /100, unit words,
mixed fractions `1 1/2`, `25 / 1/3` as 25 / (1/3)). Marks are blanked before the plain-text
scan, so `48/2 = <<48/2=24>>24` gives both the mark and the plain equation; an expression the
parser cannot read, or one inside a longer formula, is left out rather than counted wrong.
The last link of a chain (`4*x = 4*10 = 40`) is read. A result may be a percentage (`= 25%`),
cut off rather than rounded (`= 16.66`), or a division's whole part (`100 / 6 = 16`).
stated_values() gives what follows any `=`, for equations the parser cannot evaluate (`x = 80`).
Every scan is linear in the text and reads at most MAX_SCAN_CHARS of it.
Used by the label-noise pass (components/data/noise.py) and the validator (parse_number,
final_value, close); kept apart so it can be tested alone.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUM_TOKEN = re.compile(rf"(?<![\w.)])-?(?:{NUM})|(?<=[\w.)])(?:{NUM})")
"""A number as written; a minus sign belongs to it only when it cannot be a binary minus."""
_MARK = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")
_UNIT = r"(?:(?<!\s)\s*+/\s*+[A-Za-z]{2,}+|(?<!\s)\s++(?!x\b)[A-Za-z]{2,}+(?:/[A-Za-z]++)?+)"
"""One unit word after an operand, as GSM8K writes them: `3950 cases - 200 cases`, `$600/day * 5 days`.
It starts right after a non-space, so a run of spaces is scanned once, not once per space."""
_MIXED = r"(?:\d++ |\d and )\d++/\d++(?![\d.,/])"
"""A mixed fraction, `1 1/2` or `1 and 1/4` (a one-digit whole part only: `75 and 7/12` is two
numbers): one operand, not two numbers side by side."""
_MIXED_PARTS = re.compile(r"(?<![\d.,])(\d+ |\d and )(\d+)/(\d+)(?![\d.,/])")
_DIVIDE_BY_FRACTION = re.compile(r"([/÷])\s+(\d+)/(\d+)(?![\d.,/])")
"""`25 / 1/3`, `3/ 1/4`: GSM8K divides by a fraction written tight after a spaced `/`, 25 / (1/3)."""
_OPERAND = rf"(?:\(\s*+)*+[$€£]?(?>{_MIXED}|{NUM})%?+{_UNIT}?+(?:\s*+\))*+"
_OPS = "-+*/×÷^x–−"
"""Operator characters; the en dash and the minus sign are minus, as typed in GSM8K."""
_OP = rf"\s*+(?:\*\*|[{_OPS}])\s*+"
_CONTINUES = rf"(?:\s++[A-Za-z]{{2,}}+)?+\s*+(?:[{_OPS}]\s*+[\w(.$]|=)|:\d| \d{{3}}(?!\d)"
"""After a number, text that makes it part of more arithmetic (`= 240 seconds + 30 seconds`,
`= 90/x`, `= a = b`), a clock time (`6:48`) or a number with spaced thousands (`18 000`)."""
_PLAIN = re.compile(rf"(?<![\w.(:])((?>{_OPERAND})((?:{_OP}{_OPERAND})*+))"
                    rf"(?=\s*+=\s*+[$€£]?\s*+(-?(?>{NUM}))(?!\d)((?:\.{{2,3}}|…)?%)?)?")
"""A chain of operands and operators, then (in a lookahead, so that the result can start the
next link of `a = b * c = d`) `= result`. Every repetition is possessive and the chain atomic:
a chain is matched once and the scan goes on after it, so the time is linear in the text
(the earlier nested, backtracking form took 3 s on 22 KB of `1 apples + `)."""
_STATED = re.compile(rf"=\s*+[$€£]?\s*+(-?(?>{NUM}))(?![\d/])(?!{_CONTINUES})")
_EXPR_TOKEN = re.compile(rf"\s*(\*\*|//|[-+*/×÷^x()%]|{NUM})")
MAX_SCAN_CHARS = 20_000
"""equations() and stated_values() read the first this many characters of a response only: a
worked solution is a few hundred (GSM8K's longest is 1,228), and a bound keeps a
pathological row from costing more than a normal one."""
MAX_MAGNITUDE = 1e15


def parse_number(text: str | None) -> float | None:
    """A plain number ("1,000", "-3.5", "$12", "20%") as a float; None when it is not one."""
    if text is None:
        return None
    t = text.strip().replace(",", "").lstrip("$€£").rstrip(".%").strip()
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) and abs(value) <= MAX_MAGNITUDE else None


class _Parser:
    """Recursive descent over tokens: additive > multiplicative > unary > power > primary."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.at = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str:
        if self.at >= len(self.tokens):
            raise ValueError("unexpected end")
        self.at += 1
        return self.tokens[self.at - 1]

    def additive(self) -> float:
        value = self.multiplicative()
        while self.peek() in ("+", "-"):
            op, rhs = self.take(), self.multiplicative()
            value = value + rhs if op == "+" else value - rhs
        return value

    def multiplicative(self) -> float:
        value = self.unary()
        while self.peek() in ("*", "x", "×", "/", "÷", "//"):
            op, rhs = self.take(), self.unary()
            value = value * rhs if op in ("*", "x", "×") else value // rhs if op == "//" else value / rhs
        return value

    def unary(self) -> float:
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> float:
        base = self.primary()
        if self.peek() in ("^", "**"):
            self.take()
            exp = self.unary()
            if abs(exp) > 12 or abs(base) > 1e6 or (base < 0 and exp != int(exp)):
                raise ValueError("power out of range")
            return float(base) ** exp
        return base

    def primary(self) -> float:
        tok = self.take()
        if tok == "(":
            value = self.additive()
            if self.take() != ")":
                raise ValueError("unbalanced parenthesis")
        elif tok[0].isdigit() or tok[0] == ".":
            value = float(tok.replace(",", ""))
        else:
            raise ValueError(f"unexpected {tok!r}")
        if self.peek() == "%":
            self.take()
            value /= 100
        return value


@functools.lru_cache(maxsize=65536)
def evaluate(expr: str) -> float | None:
    """Value of an arithmetic expression; None when it is not one (any text is safe to pass).

    Unit words after numbers (`4 hours/day * 125 watts`) are dropped first; a mixed fraction
    `1 1/2` reads as (1 + 1/2), and `25 / 1/3` as 25 / (1/3)."""
    text = re.sub(_UNIT, "", expr).replace("$", "").replace("€", "").replace("£", "")
    text = _MIXED_PARTS.sub(lambda m: f"({m[1].split()[0]}+{m[2]}/{m[3]})", text.replace("–", "-").replace("−", "-"))
    text = _DIVIDE_BY_FRACTION.sub(r"\1 (\2/\3)", text)
    tokens, pos = [], 0
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if not m:
            if text[pos:].strip():
                return None
            break
        tokens.append(m.group(1))
        pos = m.end()
    if not tokens:
        return None
    parser = _Parser(tokens)
    try:
        value = parser.additive()
    except (ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    if parser.at != len(tokens) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return None
    return float(value)


def close(value: float | None, result: float | None, written: str = "") -> bool:
    """Whether a value matches a written result, to the decimals that the result shows."""
    if value is None or result is None:
        return False
    if abs(value - result) <= 1e-9 * max(1.0, abs(result)):  # float error only: 1,000,001 is not 1,000,000
        return True
    decimals = len(written.split(".", 1)[1]) if "." in written else 0
    return decimals > 0 and abs(value - result) <= 0.5 * 10 ** -decimals + 1e-9


def key(value: float) -> float:
    """A hashable rounding of a value, for set membership of numbers."""
    return round(value, 6)


def canon_expr(expr: str) -> str:
    """An expression without spaces, currency or thousands commas, with * and / as operators."""
    text = re.sub(r"[\s$€£,]", "", re.sub(_UNIT, "", expr))
    return text.replace("x", "*").replace("×", "*").replace("÷", "/").replace("–", "-").replace("−", "-")


@dataclass(frozen=True)
class Equation:
    """One `expr = result` of a response; spans index into the response text."""

    expr: str
    result: float
    written: str
    value: float
    """What `expr` evaluates to."""
    expr_span: tuple[int, int]
    result_span: tuple[int, int]
    mark: bool
    """A `<<expr=result>>` calculator mark (else plain text)."""
    percent: bool = False
    """The result is written as a percentage (`= 25%`) or the expression has one (`* 100%`):
    `2 / 8 * 100% = 25%` and `8 / 40 * 100% = 20` are both right, the value read either way."""

    @property
    def correct(self) -> bool:
        """The value matches the result as written: exactly, or to the decimals shown, rounded
        or cut off (`15 / 90 * 100 = 16.66`); with a percentage, also as value * 100; a whole
        result of a division may be rounded down or up (`100 / 6 = 16` pages, `= 17` boxes)."""
        values = (self.value, self.value * 100) if self.percent else (self.value,)
        decimals = len(self.written.split(".", 1)[1]) if "." in self.written else 0
        for v in values:
            if close(v, self.result, self.written) or (decimals > 0 and abs(v - self.result) < 10 ** -decimals):
                return True
            if decimals == 0 and ("/" in self.expr or "÷" in self.expr) and math.floor(v) <= self.result <= math.ceil(v):
                return True
        return False


@functools.lru_cache(maxsize=16384)
def equations(response: str | None) -> tuple[Equation, ...]:
    """The equations of a response, calculator marks and plain text, in order of their results.

    Only the first MAX_SCAN_CHARS characters are read; the time is linear in them."""
    text = (response or "")[:MAX_SCAN_CHARS]
    found: list[Equation] = []
    for m in _MARK.finditer(text):
        result, value = parse_number(m.group(2)), evaluate(m.group(1))
        if result is not None and value is not None:
            found.append(Equation(m.group(1), result, m.group(2).strip(), value, m.span(1), m.span(2), True))
    if not found or "=" in _MARK.sub("", text):
        marks = [m.start() for m in _MARK.finditer(text)]
        masked = _MARK.sub(lambda m: " " * len(m.group(0)), text)
        for m in _PLAIN.finditer(masked):
            if not m.group(2) or m.group(3) is None:
                continue  # a lone number, or a chain that is not followed by `= result`
            start, end = m.start(), m.end(4) if m.group(4) is not None else m.end(3)
            if _plain_context_bad(masked, start, end) or any(m.end(1) <= at < m.start(3) for at in marks):
                continue  # part of a longer formula, or the text twin of a mark
            result, value = parse_number(m.group(3)), evaluate(m.group(1))
            if result is not None and value is not None:
                found.append(Equation(m.group(1), result, m.group(3), value, m.span(1), m.span(3), False,
                                      m.group(4) is not None or "%" in m.group(1)))
    return tuple(sorted(found, key=lambda e: e.result_span))


_AFTER_BAD = re.compile(rf"[\w%(]|{_CONTINUES}")
_BEFORE_BAD = re.compile(rf"[{_OPS}(\d]\s*$")


def _plain_context_bad(text: str, start: int, end: int) -> bool:
    """A plain match that is part of a longer formula: `M + 4 + 2 = 8`, `2/12 = 1/6`, `21/7 = 90/x`,
    `192 / 1.2 = 1.2Y`, `a + b = c = d`. The last link of a chain `x = 4 * 10 = 40` is read (it
    states a computed result); a link followed by more arithmetic or another `=` is not."""
    return bool(_AFTER_BAD.match(text, end) or _BEFORE_BAD.search(text, max(0, start - 8), start))


def stated_values(response: str | None) -> tuple[float, ...]:
    """Every number the response states as the value of something, right after an `=` (plain
    text or a mark's result) and not the start of more arithmetic: the results of equations
    the reader cannot evaluate too (`x = 80`, `so 3/2x = 120`, `G = 80 GB`)."""
    text = (response or "")[:MAX_SCAN_CHARS]
    return tuple(v for v in (parse_number(t) for t in _STATED.findall(text)) if v is not None)


def final_value(response: str | None, marker: str = "####") -> tuple[float | None, tuple[int, int] | None]:
    """(value, span) of the number right after the last `marker` of the response, or (None, None)."""
    text = response or ""
    at = text.rfind(marker)
    if at < 0:
        return None, None
    m = NUM_TOKEN.search(text, at + len(marker))
    if not m or text[at + len(marker):m.start()].strip(" $€£\t"):
        return None, None
    return parse_number(m.group(0)), m.span()


def numbers(text: str | None) -> list[float]:
    """Every number written in the text, in order."""
    return [v for v in (parse_number(t) for t in NUM_TOKEN.findall(text or "")) if v is not None]
