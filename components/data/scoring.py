"""How well the data cleaning found the injected noise: precision and recall against the truth.

The generator writes, for every row, whether it is noise and of which kind; the cleaning
(validate's quarantine, then the filter's removals) yields the ids it dropped. A dropped noise
row is a true positive, a dropped clean row a false positive, a kept noise row a miss.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def score_cleaning(truth: list[dict[str, Any]], dropped_ids: set[str]) -> dict[str, Any]:
    """{precision, recall, tp, fp, fn, recall_by_kind: {kind: recall}} for the dropped ids."""
    noise = {t["id"] for t in truth if t["noise"]}
    tp, fp, fn = len(noise & dropped_ids), len(dropped_ids - noise), len(noise - dropped_ids)
    by_kind = Counter(t["kind"] for t in truth if t["noise"])
    caught = Counter(t["kind"] for t in truth if t["noise"] and t["id"] in dropped_ids)
    return {
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "tp": tp, "fp": fp, "fn": fn,
        "recall_by_kind": {kind: caught[kind] / n for kind, n in sorted(by_kind.items())},
    }


def clean_and_score(rows: list[dict[str, Any]], truth: list[dict[str, Any]], validate_cfg: Any,
                    filter_cfg: Any) -> dict[str, Any]:
    """Run validate (no Data Docs) then filter on `rows`; score; time both stages; the mean weight
    of the kept noise rows and of the kept clean rows."""
    import time

    from components.data.filter import filter_rows
    from components.data.validate import validate_rows

    t0 = time.perf_counter()
    validated = validate_rows(rows, validate_cfg)
    t1 = time.perf_counter()
    kept, removed, _ = filter_rows(validated.clean, filter_cfg, progress=False)
    t2 = time.perf_counter()
    dropped = {r["id"] for r in validated.quarantined} | {r["id"] for r in removed}
    result = score_cleaning(truth, dropped)
    result.update(rows=len(rows), kept=len(kept), validate_seconds=t1 - t0, filter_seconds=t2 - t1,
                  kept_noise_weight=_mean_weight(kept, truth, noise=True),
                  kept_clean_weight=_mean_weight(kept, truth, noise=False))
    return result


def _mean_weight(kept: list[dict[str, Any]], truth: list[dict[str, Any]], noise: bool) -> float:
    """Mean sample weight of the kept rows that are (or are not) noise; nan when there are none:
    noise the filter keeps is still down-weighted when this is below the clean rows' mean."""
    is_noise = {t["id"]: t["noise"] for t in truth}
    weights = [r["weight"] for r in kept if is_noise.get(r["id"]) is noise]
    return sum(weights) / len(weights) if weights else float("nan")
