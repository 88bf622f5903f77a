"""The promotion gate: does a candidate beat the production model, within bounds?

    report = evaluate_gate(GateConfig(), candidate_metrics, production_metrics, check)
    report.passed        # every rule held
    print(report.table())  # one line per rule: metric, candidate, production, rule, ok

Rules, all of which must hold (see GateConfig):
  check         check.json says passed: true (serve.check loaded and answered), when require_check
  minimums      candidate >= floor                 always, also for the first model
  maximums      candidate <= ceiling               always
  improvement   candidate - production > min_gain  on `metric` (reversed for lower-is-better)
  regression    production - candidate <= allowed  on each max_regression metric (reversed likewise)
The last two need a production model; with none, only the absolute rules apply. The gate fails
closed: a metric it needs that is missing or not a finite number fails its rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from components.registry.config import GateConfig


@dataclass(frozen=True)
class Rule:
    """One comparison of the gate."""

    metric: str
    rule: str
    candidate: Any
    production: Any
    ok: bool


@dataclass
class GateReport:
    """Every rule the gate checked, candidate vs production."""

    candidate: str
    production: str | None
    rules: list[Rule] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rules)

    def failures(self) -> list[Rule]:
        return [r for r in self.rules if not r.ok]

    def table(self) -> str:
        head = f"candidate {self.candidate} vs production {self.production or '(none)'}"
        lines = [f"  {'ok  ' if r.ok else 'FAIL'} {r.metric}: candidate {_fmt(r.candidate)}, "
                 f"production {_fmt(r.production)}; rule {r.rule}" for r in self.rules]
        return "\n".join([head, *lines])

    def as_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "production": self.production, "passed": self.passed,
                "rules": [asdict(r) for r in self.rules]}


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


def _number(metrics: dict[str, Any] | None, key: str) -> float | None:
    """metrics[key] as a finite float, or None when missing or not a finite number."""
    if metrics is None:
        return None
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def evaluate_gate(gate: GateConfig, candidate: dict[str, Any], production: dict[str, Any] | None,
                  check: dict[str, Any] | None, candidate_version: str = "candidate",
                  production_version: str | None = None) -> GateReport:
    """Check every rule; `production` is None when there is no production model to beat."""
    report = GateReport(candidate_version, production_version if production is not None else None)
    add = report.rules.append
    if gate.require_check:
        passed = isinstance(check, dict) and check.get("passed") is True
        add(Rule("check.passed", "serve.check passed: true", None if check is None else check.get("passed"),
                 None, passed))
    for key, floor in sorted(gate.minimums.items()):
        c = _number(candidate, key)
        add(Rule(key, f">= {floor}", c, None, c is not None and c >= floor))
    for key, ceiling in sorted(gate.maximums.items()):
        c = _number(candidate, key)
        add(Rule(key, f"<= {ceiling}", c, None, c is not None and c <= ceiling))
    if production is None:
        return report
    lower = gate.better_when_lower(gate.metric)
    c, p = _number(candidate, gate.metric), _number(production, gate.metric)
    if c is None or p is None:
        ok = False
    else:
        ok = (p - c if lower else c - p) > gate.min_gain
    word = "below" if lower else "above"
    add(Rule(gate.metric, f"{word} production by more than {gate.min_gain}", c, p, ok))
    for key, allowed in sorted(gate.max_regression.items()):
        if key == gate.metric:
            continue
        lower = gate.better_when_lower(key)
        c, p = _number(candidate, key), _number(production, key)
        ok = c is not None and p is not None and (c - p if lower else p - c) <= allowed
        add(Rule(key, f"{'rises' if lower else 'drops'} at most {allowed}", c, p, ok))
    return report
