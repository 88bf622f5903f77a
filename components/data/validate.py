"""The validation gate: a Great Expectations suite over a batch of canonical rows.

    distillery validate data/sample/raw.jsonl --out data/validated

Row-level expectations (non-null, lengths, character set, answer parseable, final-answer line
present, answer agrees with the response) send the rows that fail them to `quarantined.jsonl`
with their reasons; the others go to `clean.jsonl`, so clean + quarantined = input, always.
Batch-level expectations (schema, row count, duplicate rate, mean prompt length) and the share
of quarantined rows form the gate: when the gate fails, the step fails with a non-zero exit and
writes no output folder; its report and Data Docs go to `<out>.rejected/` for a person to read.

The suite runs on an ephemeral GX context with a pandas batch (the same suite runs on Spark or
SQL data sources at scale); the Data Docs site is written into the output folder, and a
self-contained `report.html` summarises it for the Kubeflow UI.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, finish, write_json
from components.config import to_dict
from components.data.config import SourceConfig, ValidateConfig
from components.data.dedup import normalize
from components.data.equations import close, final_value, parse_number
from components.data.load import CANONICAL, Row, load_canonical, load_rows, write_jsonl
from components.errors import InputError

BAD_CHARS = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd"  # control characters and U+FFFD
ROW_INDEX = "_row"


class GateFailed(InputError, RuntimeError):
    """The batch failed the validation gate; the message lists the failed expectations."""


@dataclass
class Check:
    """One expectation: its GX object, the reason code given to the rows that fail it (row-level)."""

    expectation: Any
    reason: str | None = None
    description: str = ""


@dataclass
class ValidationResult:
    clean: list[Row]
    quarantined: list[Row]
    gate_passed: bool
    report: dict[str, Any] = field(default_factory=dict)
    docs_dir: Path | None = None


DERIVED = ("_prompt_norm", "_prompt_chars", "_answer_is_number", "_final_is_number", "_answer_agrees")


def frame(rows: list[Row], marker: str = "####"):
    """The batch as a DataFrame: the canonical columns plus derived ones the suite checks.

    Numbers are read by the one number reader of the data steps (equations.parse_number), so
    "$12", "1,000" and "20%" mean the same here as in the filter."""
    import pandas as pd

    df = pd.DataFrame([{k: r.get(k) for k in CANONICAL} for r in rows], columns=list(CANONICAL)).astype(object)
    df = df.where(df.notna(), None)
    df[ROW_INDEX] = range(len(df))
    df["_prompt_norm"] = [normalize(p) for p in df["prompt"]]
    df["_prompt_chars"] = [len(p or "") for p in df["prompt"]]
    answers = [parse_number(a) for a in df["answer"]]
    finals = [final_value(r, marker)[0] for r in df["response"]]
    # each derived check flags only its own fault: a null or a missing marker is flagged elsewhere
    df["_answer_is_number"] = [v is not None or a is None for v, a in zip(answers, df["answer"])]
    df["_final_is_number"] = [v is not None or marker not in (r or "") for v, r in zip(finals, df["response"])]
    df["_answer_agrees"] = [a is None or f is None or close(f, a) for a, f in zip(answers, finals)]
    return df


def suite_checks(cfg: ValidateConfig, marker: str = "####") -> list[Check]:
    """The expectation suite, built from the config."""
    import great_expectations.expectations as gxe

    mostly = max(1e-9, 1.0 - cfg.max_quarantine_fraction)
    checks: list[Check] = [
        Check(gxe.ExpectTableColumnsToMatchSet(column_set=[*CANONICAL, ROW_INDEX, *DERIVED], exact_match=True),
              description="schema: exactly the canonical columns"),
        Check(gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows), description=f"at least {cfg.min_rows} rows"),
        Check(gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="_prompt_norm", min_value=1.0 - cfg.max_duplicate_fraction),
            description=f"duplicate prompts at most {cfg.max_duplicate_fraction:.0%}"),
        Check(gxe.ExpectColumnMeanToBeBetween(column="_prompt_chars", min_value=cfg.mean_prompt_chars[0],
                                              max_value=cfg.mean_prompt_chars[1]),
              description="distribution: mean prompt length"),
    ]
    for col in ("prompt", "response", "answer"):
        checks.append(Check(gxe.ExpectColumnValuesToNotBeNull(column=col, mostly=mostly), f"null_{col}",
                            f"{col} is not null"))
        checks.append(Check(gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=["str"]), None,
                            f"{col} is text"))
    for col, (lo, hi) in (("prompt", cfg.prompt_chars), ("response", cfg.response_chars)):
        checks.append(Check(gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=lo, max_value=hi,
                                                                    mostly=mostly),
                            f"length_{col}", f"{col} length in [{lo}, {hi}]"))
        checks.append(Check(gxe.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S", mostly=mostly),
                            f"blank_{col}", f"{col} is not blank"))
        checks.append(Check(gxe.ExpectColumnValuesToNotMatchRegex(column=col, regex=f"[{BAD_CHARS}]", mostly=mostly),
                            f"charset_{col}", f"{col} has no control or replacement characters"))
    checks += [
        Check(gxe.ExpectColumnValuesToBeInSet(column="_answer_is_number", value_set=[True], mostly=mostly),
              "answer_not_number", "answer parses as a number"),
        Check(gxe.ExpectColumnValuesToMatchRegex(column="response", regex=re.escape(marker) + r"\s*\S",
                                                 mostly=mostly),
              "no_final_answer", f"response has a '{marker} <answer>' line"),
        Check(gxe.ExpectColumnValuesToBeInSet(column="_final_is_number", value_set=[True], mostly=mostly),
              "final_not_number", f"the response's final answer after '{marker}' is a number"),
        Check(gxe.ExpectColumnValuesToBeInSet(column="_answer_agrees", value_set=[True], mostly=mostly),
              "answer_disagrees", "answer equals the response's final answer"),
    ]
    return checks


def _context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="distillery", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},  # GX wants it absolute
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    return ctx


def validate_rows(rows: list[Row], cfg: ValidateConfig, docs_dir: Path | None = None,
                  marker: str = "####") -> ValidationResult:
    """Run the suite on `rows`; split them into clean and quarantined; decide the gate.

    `marker` is the source's answer marker (source.answer_marker)."""
    import great_expectations as gx

    started = time.perf_counter()
    df = frame(rows, marker)
    checks = suite_checks(cfg, marker)
    ctx = _context(docs_dir)
    batch_def = ctx.data_sources.add_pandas("rows").add_dataframe_asset("batch").add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="distillery_rows"))
    for check in checks:
        suite.add_expectation(check.expectation)
    vdef = ctx.validation_definitions.add(gx.ValidationDefinition(name="rows", data=batch_def, suite=suite))
    result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_INDEX]}
    actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["distillery"])] if docs_dir else []
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(name="gate", validation_definitions=[vdef], actions=actions,
                                                   result_format=result_format))
    run = checkpoint.run(batch_parameters={"dataframe": df})
    (outcome,) = run.run_results.values()

    by_id = {check.expectation.id: check for check in checks}  # ids are set when added to the suite
    reasons: dict[int, list[str]] = {}
    expectations = []
    for res in outcome.results:
        cfg_ = res.expectation_config
        check = by_id[cfg_.id]
        bad = [item[ROW_INDEX] for item in (res.result.get("unexpected_index_list") or [])]
        if check.reason:
            for i in bad:
                reasons.setdefault(int(i), []).append(check.reason)
        expectations.append({
            "expectation": cfg_.type, "column": cfg_.kwargs.get("column"), "description": check.description,
            "success": bool(res.success), "unexpected": res.result.get("unexpected_count"),
            "observed": _plain(res.result.get("observed_value")), "quarantines": check.reason})

    quarantined = [{**rows[i], "reasons": r} for i, r in sorted(reasons.items())]
    clean = [row for i, row in enumerate(rows) if i not in reasons]
    fraction = len(quarantined) / max(1, len(rows))
    failed = [e["description"] for e in expectations if not e["success"]]
    if fraction > cfg.max_quarantine_fraction:
        failed.append(f"{fraction:.1%} of rows quarantined, over max_quarantine_fraction "
                      f"{cfg.max_quarantine_fraction:.0%}")
    counts: dict[str, int] = {}
    for r in reasons.values():
        for reason in r:
            counts[reason] = counts.get(reason, 0) + 1
    report = {
        "gate_passed": not failed, "failed": failed, "rows": len(rows), "clean": len(clean),
        "quarantined": len(quarantined), "quarantined_fraction": round(fraction, 4),
        "quarantine_reasons": dict(sorted(counts.items())), "expectations": expectations,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return ValidationResult(clean, quarantined, not failed, report, docs_dir)


def _plain(value: Any) -> Any:
    """Observed values as JSON-friendly scalars."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def check_mark(expectation: dict[str, Any]) -> str:
    """✘ where the expectation failed the batch, ⚠ where it passed within `mostly` but some rows
    missed it (they are quarantined), ✔ where every row met it: the mark agrees with the count."""
    if not expectation["success"]:
        return "✘"
    return "⚠" if expectation["unexpected"] else "✔"


def report_html(report: dict[str, Any]) -> str:
    """A self-contained page for the Kubeflow UI: the gate, the counts, every expectation."""
    status = "PASSED" if report["gate_passed"] else "FAILED"
    color = "#1a7f37" if report["gate_passed"] else "#cf222e"
    rows = "".join(
        f"<tr><td>{check_mark(e)}</td><td>{html.escape(e['description'])}</td>"
        f"<td>{html.escape(str(e['column'] or ''))}</td><td>{e['unexpected'] if e['unexpected'] is not None else ''}</td>"
        f"<td>{html.escape(str(e['observed'] if e['observed'] is not None else ''))}</td></tr>"
        for e in report["expectations"])
    reasons = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in report["quarantine_reasons"].items())
    failed = "".join(f"<li>{html.escape(f)}</li>" for f in report["failed"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Validation gate: {status}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>Validation gate: <span style="color:{color}">{status}</span></h1>
<p>{report['rows']} rows: {report['clean']} clean, {report['quarantined']} quarantined ({report['quarantined_fraction']:.1%}).</p>
{f'<h2>Why it failed</h2><ul>{failed}</ul>' if failed else ''}
<h2>Quarantine reasons</h2><table><tr><th>reason</th><th>rows</th></tr>{reasons}</table>
<h2>Expectations</h2><p>✔ every row meets it; ⚠ the batch passes, and the rows that do not meet it are
quarantined; ✘ the gate fails on it.</p>
<table><tr><th></th><th>expectation</th><th>column</th><th>unexpected rows</th><th>observed</th></tr>{rows}</table>
<p>The full Great Expectations Data Docs are in <code>data_docs/index.html</code> of the step's output
folder (<code>&lt;out&gt;.rejected/</code> when the gate failed).</p></body></html>"""


def run(input_path: str | os.PathLike, cfg: ValidateConfig, out_dir: str | os.PathLike,
        source: SourceConfig | None = None, canonical: bool = False) -> dict[str, Any]:
    """The `validate` step: clean.jsonl, quarantined.jsonl, report.json/.html, data_docs/, manifest.

    `input_path` is raw data read through `source`'s mapping, or, with `canonical`, a file of
    canonical rows that an earlier step wrote (extra columns travel on). Raises DataError for
    input that cannot be read and GateFailed when the gate fails; in both cases `out_dir` is
    left as it was.
    """
    out_dir = Path(out_dir)
    source = source or SourceConfig()
    rows = load_canonical(input_path) if canonical else load_rows(input_path, source)
    with atomic_dir(out_dir, inputs=(input_path,)) as tmp:
        result = validate_rows(rows, cfg, tmp / "data_docs" if cfg.data_docs else None, source.answer_marker)
        report = result.report
        write_json(tmp / "report.json", report)
        (tmp / "report.html").write_text(report_html(report), encoding="utf-8")
        if not result.gate_passed:
            rejected = out_dir.with_name(out_dir.name + ".rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            shutil.copytree(tmp, rejected)
            raise GateFailed(f"{input_path}: validation gate failed: " + "; ".join(report["failed"])
                             + f" (report: {rejected / 'report.html'})")
        write_jsonl(tmp / "clean.jsonl", result.clean)
        write_jsonl(tmp / "quarantined.jsonl", result.quarantined)
        metrics = {k: report[k] for k in ("rows", "clean", "quarantined", "quarantined_fraction")}
        metrics["gate_passed"] = True
        outputs = {name: tmp / name for name in ("clean.jsonl", "quarantined.jsonl", "report.json")}
        finish(tmp, "validate", {"rows": input_path},
               {"validate": to_dict(cfg), "source": to_dict(source)}, metrics, outputs)
    shutil.rmtree(out_dir.with_name(out_dir.name + ".rejected"), ignore_errors=True)
    return metrics
