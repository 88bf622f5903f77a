"""What the registry writes about itself: tag and commit messages, and the reports it accepts.

    message = tag_message("promote lm v0.0.2 to staging", {"action": "promote", ...})
    parse_message(message)       # the record back; None for a tag someone made by hand
    metrics, where = load_report("runs/evaluate/metrics.json", default, "metrics")

A message is a summary line, a blank line, and the record as one JSON line (sorted keys), so
`git tag -n`, `gto history` and a program all read it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from components.registry.errors import RegistryError


def tag_message(summary: str, record: dict[str, Any]) -> str:
    """Tag/commit message: a summary line, a blank line, the record as one JSON line."""
    return f"{summary}\n\n{json.dumps(record, sort_keys=True, default=str)}"


def parse_message(message: str | None) -> dict[str, Any] | None:
    """The JSON record of a message written by `tag_message`, or None (a tag made by hand)."""
    for line in (message or "").splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "action" in record:
                return record
    return None


def load_report(value: dict | str | os.PathLike | None, default: Path, what: str) -> tuple[dict, str]:
    """(report, where) from a dict, a JSON file, or `default` when None."""
    if isinstance(value, dict):
        return dict(value), what
    path = Path(value) if value is not None else default
    if not path.is_file():
        raise RegistryError(f"{path}: missing; registering needs the {what} ({path.name})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path}: is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data, str(path)


def check_metrics(metrics: dict, where: str) -> None:
    """Metric names are strings; numbers are finite (NaN and inf are refused, nested ones too)."""
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise RegistryError(f"{where}: metric names must be non-empty strings, got {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RegistryError(f"{where}: field {key!r} is {value}; metrics must be finite numbers")
    try:
        json.dumps(metrics, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{where}: not JSON-serialisable: {err}") from None


def check_check(check: dict, where: str) -> None:
    """A serve.check report says `passed: true` or `passed: false`, nothing vaguer."""
    if not isinstance(check.get("passed"), bool):
        raise RegistryError(f"{where}: field 'passed' must be true or false, got {check.get('passed')!r}")
