"""The `filter` step: exact and near-duplicate removal, quality heuristics, label noise, weights.

    distillery filter data/validated/clean.jsonl --out data/filtered
    python -c "from components.data.filter import run; from components.data.config import FilterConfig; \\
               print(run('data/validated/clean.jsonl', FilterConfig(), 'data/filtered'))"

Passes, in order, each on what the previous left (the first of several copies is the one kept):

1. exact_duplicate  same prompt and response after NFKC, casefold, whitespace collapse (dedup.py);
2. near_duplicate   MinHash LSH over word shingles of the prompt, confirmed by exact Jaccard;
3. quality:<code>   Gopher/C4-style heuristics on prompt and response (quality.py);
4. label_noise      confident learning with a self-supervised proxy verifier (noise.py); a
                    flagged row is dropped only when its p(answer right) < `drop_below`, the
                    others are kept with their (low) weight: `flagged_kept_downweighted`.

Every kept row gets a `weight`: the proxy's out-of-fold probability that its answer is right,
normalised to mean 1 over the kept rows and floored at `min_weight` (dynamic data weighting,
as in DeepSeek's data pipeline, where doubtful rows are down-weighted rather than dropped).
Rows keep every column they came with (a `weight` already there is replaced); a removed row
gets `reason` and a human `detail` (for duplicates it names the id of the row kept in its
place). kept + removed = input, always, ids untouched.

The output folder appears whole or not at all: kept.jsonl, removed.jsonl, report.json,
report.html (counts and the chart, self-contained), removal_reasons.png, metrics.json and
manifest.json. The filter runs after the validator and does not repeat its checks, but rows
the validator would quarantine (None fields, an answer that is no number) never crash it.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, finish, write_json
from components.config import to_dict
from components.data.config import FilterConfig
from components.data.dedup import exact_duplicates, near_duplicates
from components.data.load import Row, load_canonical, write_jsonl
from components.data.noise import detect_label_noise, normalized_weights
from components.data.quality import quality_issue

FLAGGED_EXAMPLES = 10
"""How many flagged-but-kept rows the report lists by id (all are counted)."""


def filter_rows(rows: list[Row], cfg: FilterConfig, progress: bool = True) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """(kept, removed, report) for `rows` (canonical fields, and any others, which are carried
    through); pure: nothing is read or written."""
    timings: dict[str, float] = {}
    removed: dict[int, Row] = {}

    def drop(i: int, reason: str, detail: str) -> None:
        removed[i] = {**rows[i], "reason": reason, "detail": detail}

    t = time.perf_counter()
    for i, j in exact_duplicates(rows).items():
        drop(i, "exact_duplicate", f"same prompt and response as {rows[j].get('id')} (after normalization)")
    timings["exact_duplicate"] = time.perf_counter() - t

    t = time.perf_counter()
    alive = [i for i in range(len(rows)) if i not in removed]
    for k, (j, sim) in near_duplicates([rows[i] for i in alive], cfg, progress=progress).items():
        drop(alive[k], "near_duplicate", f"prompt {sim:.0%} similar (word {cfg.shingle_words}-shingle Jaccard) "
                                         f"to {rows[alive[j]].get('id')}")
    timings["near_duplicate"] = time.perf_counter() - t

    t = time.perf_counter()
    for i in range(len(rows)):
        if i not in removed and (issue := quality_issue(rows[i], cfg)):
            drop(i, f"quality:{issue[0]}", issue[1])
    timings["quality"] = time.perf_counter() - t

    t = time.perf_counter()
    alive = [i for i in range(len(rows)) if i not in removed]
    flagged_kept: list[dict[str, Any]] = []
    if cfg.label_noise and alive:
        result = detect_label_noise([rows[i] for i in alive], cfg)
        for k in sorted(result.issues):
            detail = f"p(answer right) = {result.p_label[k]:.2f}: {result.hints[k]}"
            if result.p_label[k] < cfg.drop_below:
                drop(alive[k], "label_noise", detail)
            else:
                flagged_kept.append({"id": rows[alive[k]].get("id"), "detail": detail})
        p_of = {i: result.p_label[k] for k, i in enumerate(alive)}
        noise_report = {**result.report, "drop_below": cfg.drop_below,
                        "dropped": len(result.issues) - len(flagged_kept),
                        "flagged_kept_downweighted": len(flagged_kept),
                        "flagged_kept_examples": flagged_kept[:FLAGGED_EXAMPLES]}
    else:
        p_of, noise_report = {i: 1.0 for i in alive}, {"fitted": False, "disabled": not cfg.label_noise}
    timings["label_noise"] = time.perf_counter() - t

    keep = [i for i in range(len(rows)) if i not in removed]
    weights = normalized_weights([p_of[i] for i in keep], cfg.min_weight)
    kept = [{**rows[i], "weight": w} for i, w in zip(keep, weights)]
    gone = [removed[i] for i in sorted(removed)]
    counts = Counter(r["reason"] for r in gone)
    report = {
        "rows_in": len(rows), "rows_kept": len(kept), "rows_removed": len(gone),
        "removed_by_reason": dict(sorted(counts.items())),
        "flagged_kept_downweighted": len(flagged_kept),
        "weights": _summary([r["weight"] for r in kept]),
        "label_noise": noise_report,
        "seconds": {k: round(v, 3) for k, v in timings.items()} | {"total": round(sum(timings.values()), 3)},
    }
    return kept, gone, report


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": round(sum(values) / len(values), 6), "min": min(values), "max": max(values)}


def plot(report: dict[str, Any], weights: list[float], path: Path) -> None:
    """removal_reasons.png: removals per reason (left), histogram of the kept rows' weights (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    counts = report["removed_by_reason"]
    names = list(counts) or ["(none)"]
    left.barh(names, [counts.get(n, 0) for n in names], color="#c0504d")
    left.invert_yaxis()
    left.set_xlabel("rows removed")
    left.set_title(f"{report['rows_removed']} of {report['rows_in']} rows removed")
    for y, n in enumerate(names):
        left.text(counts.get(n, 0), y, f" {counts.get(n, 0)}", va="center")
    right.hist(weights or [0.0], bins=30, color="#4f81bd")
    right.set_xlabel("sample weight")
    right.set_ylabel("kept rows")
    right.set_title(f"weights of {report['rows_kept']} kept rows (mean {report['weights']['mean']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_html(report: dict[str, Any], png: Path) -> str:
    """A small self-contained page: the counts table and the chart as a data: URI."""
    esc = html.escape
    lines = [f"<tr><td>{esc(reason)}</td><td>{n}</td><td>{n / max(1, report['rows_in']):.1%}</td></tr>"
             for reason, n in report["removed_by_reason"].items()]
    noise = report["label_noise"]
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>distillery filter report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}</style></head><body>
<h1>Filter report</h1>
<p>{report['rows_in']} rows in, {report['rows_kept']} kept, {report['rows_removed']} removed;
weights mean {report['weights']['mean']:.3f}, min {report['weights']['min']:.3f}, max {report['weights']['max']:.3f}.</p>
<table><tr><th>reason</th><th>rows removed</th><th>of input</th></tr>
{''.join(lines) or '<tr><td colspan="3">nothing removed</td></tr>'}</table>
<p>Label noise: {esc(', '.join(f'{k} {v}' for k, v in noise.items() if not isinstance(v, (dict, list))))}.</p>
<p>Seconds: {esc(', '.join(f'{k} {v}' for k, v in report['seconds'].items()))}.</p>
<img alt="removals per reason and weight histogram" src="data:image/png;base64,{image}">
</body></html>
"""


def run(input_path: str | os.PathLike, cfg: FilterConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """The `filter` step: read canonical JSONL, filter, write the outputs (all or nothing)."""
    rows = load_canonical(input_path)  # extra columns travel on
    kept, removed, report = filter_rows(rows, cfg)
    metrics: dict[str, Any] = {"rows": len(rows), "rows_kept": len(kept), "rows_removed": len(removed)}
    metrics.update({f"removed_{reason.replace(':', '_')}": n for reason, n in report["removed_by_reason"].items()})
    metrics.update({"weight_min": report["weights"]["min"], "weight_max": report["weights"]["max"],
                    "flagged_kept_downweighted": report["flagged_kept_downweighted"],
                    "seconds": report["seconds"]["total"]})
    with atomic_dir(Path(out_dir), inputs=(input_path,)) as tmp:
        outputs = {name: tmp / name for name in ("kept.jsonl", "removed.jsonl", "report.json",
                                                 "removal_reasons.png", "report.html")}
        write_jsonl(outputs["kept.jsonl"], kept)
        write_jsonl(outputs["removed.jsonl"], removed)
        write_json(outputs["report.json"], report)
        plot(report, [r["weight"] for r in kept], outputs["removal_reasons.png"])
        outputs["report.html"].write_text(render_html(report, outputs["removal_reasons.png"]), encoding="utf-8")
        finish(tmp, "filter", {"rows": input_path}, to_dict(cfg), metrics, outputs)
    return metrics
