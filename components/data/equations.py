"""Numbers and equations in worked solutions, read without eval(): the verifier's eyes.

    from components.data.equations import equations, evaluate, final_value
    evaluate("48/2")                      # 24.0 (None for anything that is not arithmetic)
    [(e.expr, e.result, e.correct) for e in equations("48/2 = <<48/2=24>>24 clips")]
    final_value("...\\n#### 72")         # (72.0, span of "72")

An equation is either a GSM8K calculator mark `<<48/2=24>>` or plain text `48 / 2 = 24`
(operators + - * x × / ÷ ^ **, parentheses, `$`, thousands commas, `%` as /100). Marks are
blanked before the plain-text scan, so `48/2 = <<48/2=24>>24` gives both the mark and the
plain equation; an expression the parser cannot read is left out rather than counted wrong.
Used by the label-noise pass (components/data/noise.py); kept apart so it can be tested alone.
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
_UNIT = r"(?:\s*/\s*[A-Za-z]{2,}|\s+(?!x\b)[A-Za-z]{2,}(?:/[A-Za-z]+)?)"
"""One unit word after an operand, as GSM8K writes them: `3950 cases - 200 cases`, `$600/day * 5 days`."""
_OPERAND = rf"(?:\(\s*)*[$€£]?(?:{NUM})%?{_UNIT}?(?:\s*\))*"
_PLAIN = re.compile(rf"(?<![\w.])({_OPERAND}(?:\s*(?:\*\*|[-+*/×÷^x])\s*{_OPERAND})+)"
                    rf"\s*=\s*[$€£]?\s*(-?(?:{NUM}))(?!\d)")
_EXPR_TOKEN = re.compile(rf"\s*(\*\*|//|[-+*/×÷^x()%]|{NUM})")
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

    Unit words after numbers (`4 hours/day * 125 watts`) are dropped first."""
    text = re.sub(_UNIT, "", expr).replace("$", "").replace("€", "").replace("£", "")
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
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    if parser.at != len(tokens) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        return None
    return float(value)


def close(value: float | None, result: float | None, written: str = "") -> bool:
    """Whether a value matches a written result, to the decimals that the result shows."""
    if value is None or result is None:
        return False
    if abs(value - result) <= 1e-6 * max(1.0, abs(result)):
        return True
    decimals = len(written.split(".", 1)[1]) if "." in written else 0
    return decimals > 0 and abs(value - result) <= 0.5 * 10 ** -decimals + 1e-9


def key(value: float) -> float:
    """A hashable rounding of a value, for set membership of numbers."""
    return round(value, 6)


def canon_expr(expr: str) -> str:
    """An expression without spaces, currency or thousands commas, with * and / as operators."""
    return re.sub(r"[\s$€£,]", "", re.sub(_UNIT, "", expr)).replace("x", "*").replace("×", "*").replace("÷", "/")


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

    @property
    def correct(self) -> bool:
        return close(self.value, self.result, self.written)


@functools.lru_cache(maxsize=16384)
def equations(response: str | None) -> tuple[Equation, ...]:
    """The equations of a response, calculator marks and plain text, in order of their results."""
    text = response or ""
    found: list[Equation] = []
    for m in _MARK.finditer(text):
        result, value = parse_number(m.group(2)), evaluate(m.group(1))
        if result is not None and value is not None:
            found.append(Equation(m.group(1), result, m.group(2).strip(), value, m.span(1), m.span(2), True))
    if not found or "=" in _MARK.sub("", text):
        marks = [m.start() for m in _MARK.finditer(text)]
        masked = _MARK.sub(lambda m: " " * len(m.group(0)), text)
        for m in _PLAIN.finditer(masked):
            if _plain_context_bad(masked, m) or any(m.end(1) <= at < m.start(2) for at in marks):
                continue  # part of a longer chain or formula, or the text twin of a mark
            result, value = parse_number(m.group(2)), evaluate(m.group(1))
            if result is not None and value is not None:
                found.append(Equation(m.group(1), result, m.group(2), value, m.span(1), m.span(2), False))
    return tuple(sorted(found, key=lambda e: e.result_span))


_AFTER_BAD = re.compile(r"[\w%(]|\s*(?:[-+*/×÷^x]\s*[\d(.$]|=)")
_BEFORE_BAD = re.compile(r"[-+*/×÷^=(\d]\s*$")


def _plain_context_bad(text: str, m: re.Match) -> bool:
    """A plain match that is part of a longer formula: `M + 4 + 2 = 8`, `2/12 = 1/6`, `a = b = c`,
    `192 / 1.2 = 1.2Y`, `8 x 1 1/2 = 12`."""
    return bool(_AFTER_BAD.match(text, m.end()) or _BEFORE_BAD.search(text, max(0, m.start() - 8), m.start()))


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
