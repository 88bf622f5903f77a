"""Label-noise detection by confident learning, and sample weights: the `filter` step's last pass.

    from components.data.noise import detect_label_noise
    result = detect_label_noise(rows, FilterConfig())  # .issues (row indices), .p_label, .report

The "label" of a row is its final answer (the `answer` field, else the number after the last
`####` of the response). There are no trusted labels to learn from, so the proxy task is
self-supervised, in the spirit of Northcutt et al.'s confident learning (cleanlab):

1. Negatives. Every row that has a numeric label gets `NEGATIVES_PER_ROW` corrupted copies,
   each made by one of three generic corruptions of the label (none reads the generator):
   - final: the answer after `####` and in the answer field is changed (off by a little, by a
     factor of 2 or 10, or another row's answer); one time in four only the answer field;
   - step: the result of one computed equation is changed and the change is carried through
     every later equation, the final line and the answer field, so the copy is internally
     consistent except for that one miscomputed step;
   - swap: the response and answer of another row, under this row's prompt.
   Departure from the suggested design (corrupting only the final answer): a model trained on
   final-answer corruptions alone learns "answer == last result" and is blind to a miscomputed
   step carried to the end, or to a whole solution of another problem, both of which are
   common ways a real label goes wrong; the three families cover them, generically.
2. Features a verifier would look at (`features`, equations read by components/data/equations
   without eval()): whether there are equations, the fraction that are correct and whether any
   is wrong, whether the answer is among the results (those of the equations, and the values
   the text states after an `=` that the reader cannot evaluate: `x = 80`) and its log
   relative gap to the nearest one, the fraction of operands that come from the prompt
   (numbers, number words, percentages) or from earlier results, the fraction of the prompt's
   numbers the response uses, the overlap of the response's words with the prompt's, and
   whether the response's `####` value equals the answer field. Departure: "answer == LAST
   result" is no feature (nor a hint), since GSM8K solutions often end with a comparison or a check after
   the answer's computation; with it (and before the reader skipped chained formulas such as
   `M + 4 + 2 = 8` or `2/12 = 1/6`) 6 % of GSM8K rows were flagged, after, 3.4 %. "Among the
   results" plus the gap carry the same signal without that bias. Reading what GSM8K writes
   (percent results, chain links `= 4 * 10 = 40`, mixed fractions, `25 / 1/3`, whole results
   of divisions, stated values) took GSM8K train from 3.7 % flagged to 1.65 %.
3. A proxy model (standardised, class-balanced logistic regression: monotone, so it generalises
   from the corruption families to their combinations instead of memorising their patterns)
   gives out-of-fold probabilities of "original (1)" vs "corrupted (0)"; folds (`folds`,
   `seed`) are drawn per source row, so a row and its corruptions are always in the same fold.
   Prune and refit (REFIT): the originals flagged in step 4 leave the training folds and the
   model is fitted again; its out-of-fold p is what the row's p(label right) is. Why: wrong
   originals in the "original" class soften the model in proportion to the noise rate (with
   20 % wrong answers their p sat between 0.1 and 0.5, on GSM8K under 0.05), so a threshold
   on p meant different things on different data; after the refit, wrong answers on
   generated data sit below 0.2 as well.
4. cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=`noise_filter_by`) over the
   augmented set; an ORIGINAL row whose label 1 is an issue is label noise. Departure: the
   default is cleanlab's `predicted_neq_given`, not its `prune_by_noise_rate`. Confident
   learning's per-class threshold is the class's mean self-confidence, and the corrupted class
   here is dominated by blatant corruptions (an answer 10x off), so its threshold sits above
   what a subtle real error reaches: on generated data with 20 % wrong answers the noise-rate
   pruning found 26 % of them, predicted_neq_given 98 % at precision 1.0 (GSM8K: 2.6 % vs
   3.4 % of rows flagged). The class-balanced model puts the argmax at even odds of
   "looks original" vs "looks corrupted", whatever NEGATIVES_PER_ROW is. The noise-rate
   estimate is still reported (`cl_estimated_issues`) as a cross-check.
5. The filter (components/data/filter.py) drops a flagged row when its p < `drop_below` and
   keeps the others, down-weighted. Weights (dynamic data weighting): the out-of-fold
   probability of a kept row's given label, normalised by `normalized_weights` to mean 1 over
   kept rows with a floor at `min_weight`.

Rows without a numeric label (plain text, an answer that is no number) are not judged: they
are never flagged and take a neutral probability. With fewer than MIN_ROWS judged rows the
model is not fitted and nothing is flagged. Deterministic for a fixed seed.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.data.config import FilterConfig
from components.data.equations import (NUM, NUM_TOKEN, Equation, canon_expr, close, equations, evaluate,
                                       final_value, key, numbers, parse_number, stated_values)

NEGATIVES_PER_ROW = 2
"""Corrupted copies made of each judged row (the proxy task's class 0)."""
REFIT = True
"""Refit the proxy without the flagged originals before reading p(label right) (step 3 above)."""
MIN_ROWS = 20
"""Fewer judged rows than this: no model, nothing flagged, neutral weights."""

_WORDS = re.compile(r"[^\W\d_]{3,}")
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "hundred": 100,
                "thousand": 1000, "half": 2, "twice": 2, "double": 2, "triple": 3, "quarter": 4,
                "dozen": 12, "percent": 100}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_PERCENT = re.compile(rf"(?<![\d.,])((?>{NUM}))\s*+%")
STOPWORDS = set("the and for with that this has have had are was were how many much does did each from "
                "then they she his her him there what will into per all more now its their them than "
                "which who when you your our can also".split())
FEATURES = ("has_equations", "frac_correct", "any_wrong", "answer_in_results",
            "log_gap", "operand_provenance", "prompt_coverage", "word_overlap", "final_matches_answer")


def label_of(row: dict[str, Any]) -> float | None:
    """The numeric label: the answer field, else the response's final `####` value."""
    value = parse_number(row.get("answer"))
    return value if value is not None else final_value(row.get("response"))[0]


@functools.lru_cache(maxsize=8192)
def _prompt_facts(prompt: str) -> tuple[frozenset, frozenset, frozenset]:
    """(numbers an operand may come from, numbers written, words) of a prompt, as keys."""
    written = {key(v) for v in numbers(prompt)}
    known = set(written) | {key(parse_number(n) / 100) for n in _PERCENT.findall(prompt) if parse_number(n)}
    known |= {key(NUMBER_WORDS[w.lower()]) for w in _NUMBER_WORD.findall(prompt)}
    words = frozenset(w.lower() for w in _WORDS.findall(prompt))
    return frozenset(known | {key(100.0)} if "%" in prompt else known), frozenset(written), words


@functools.lru_cache(maxsize=8192)
def _response_facts(response: str) -> tuple[tuple[Equation, ...], int, int, frozenset, frozenset, tuple]:
    """(equations, distinct equations, distinct wrong ones, numbers written, content words,
    results: the equations' results and the other values stated after an `=`)."""
    eqs = equations(response)
    distinct = {(canon_expr(e.expr), key(e.result)): e for e in eqs}
    wrong = sum(1 for e in distinct.values() if not e.correct)
    words = frozenset(w.lower() for w in _WORDS.findall(response)) - STOPWORDS
    results = tuple(e.result for e in eqs) + stated_values(response)
    return eqs, len(distinct), wrong, frozenset(key(v) for v in numbers(response)), words, results


def features(prompt: str | None, response: str | None, answer: str | None) -> tuple[list[float], str]:
    """The verifier's feature vector (in the order of FEATURES) and a one-line human hint."""
    prompt, response = prompt or "", response or ""
    known, prompt_nums, prompt_words = _prompt_facts(prompt)
    eqs, n_distinct, n_wrong, resp_nums, resp_words, results = _response_facts(response)
    final, _ = final_value(response)
    label = parse_number(answer)
    if label is None:
        label = final
    hint = []
    if results and label is not None:
        in_results = float(key(label) in {key(r) for r in results})
        nearest = min(results, key=lambda r: abs(label - r))
        gap = min(5.0, math.log1p(abs(label - nearest) / max(1.0, abs(nearest))))
        if not in_results:
            hint.append(f"answer {_fmt(label)} is none of the {len(set(results))} values the solution computes "
                        f"or states (nearest {_fmt(nearest)})")
    else:
        in_results, gap = 1.0, 0.0
    if n_wrong:
        bad = next(e for e in eqs if not e.correct)
        hint.append(f"{n_wrong}/{n_distinct} equation(s) wrong, e.g. {bad.expr.strip()}={bad.written}")
    explained = total = 0
    earlier: set[float] = set()
    for e in eqs:
        for v in numbers(e.expr):
            total += 1
            explained += key(v) in known or key(v) in earlier
        earlier.add(key(e.result))
    provenance = explained / total if total else 1.0
    coverage = len(prompt_nums & resp_nums) / len(prompt_nums) if prompt_nums else 1.0
    overlap = len(resp_words & prompt_words) / len(resp_words) if resp_words else 1.0
    if overlap < 0.3 and coverage < 0.5:
        hint.append("the response reads like the solution of another problem")
    matches = float(final is None or label is None or close(final, label))
    if not matches:
        hint.append(f"answer field {answer!s} disagrees with the response's final line ({_fmt(final)})")
    vec = [float(bool(eqs)), 1.0 - n_wrong / n_distinct if n_distinct else 1.0, float(n_wrong > 0),
           in_results, gap, provenance, coverage, overlap, matches]
    return vec, "; ".join(hint) or "the proxy model finds the label unlikely"


# ---- corruptions (self-supervised negatives) ---------------------------------------------------

def _fmt(value: float) -> str:
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.2f}".rstrip("0").rstrip(".")


def perturb(value: float, rng: random.Random, pool: list[float]) -> float:
    """A plausible wrong value near `value`: off by a little, by a factor, or another row's."""
    for _ in range(10):
        how = rng.random()
        if how < 0.5:
            step = rng.randint(1, max(3, int(abs(value)) // 3 + 1))
            new = value + rng.choice((-1, 1)) * (step if value == int(value) else step * 0.5)
        elif how < 0.75:
            factor = rng.choice((2, 10))
            new = value * factor if rng.random() < 0.5 or value % factor else value / factor
        else:
            new = rng.choice(pool) if pool else value + 1
        if not close(new, value):
            return new
    return value + 1


def _replace_spans(text: str, edits: dict[tuple[int, int], str]) -> str:
    for (start, end), new in sorted(edits.items(), reverse=True):
        text = text[:start] + new + text[end:]
    return text


def corrupt_final(row: dict[str, Any], label: float, rng: random.Random, pool: list[float]) -> dict[str, Any]:
    """The final answer changed, in the `####` line and the answer field (1 in 4: the field only)."""
    new = _fmt(perturb(label, rng, pool))
    response = row.get("response") or ""
    _, span = final_value(response)
    if span is not None and rng.random() >= 0.25:
        response = _replace_spans(response, {span: new})
    return {**row, "response": response, "answer": new}


def corrupt_step(row: dict[str, Any], label: float, rng: random.Random) -> dict[str, Any] | None:
    """One equation's result changed and carried through later equations and the answer."""
    response = row.get("response") or ""
    eqs = equations(response)
    if not eqs:
        return None
    k = eqs[rng.randrange(len(eqs))]
    forced_expr, forced = canon_expr(k.expr), perturb(k.result, rng, [])
    result_at = {e.result_span[0]: e for e in eqs}
    mapping: dict[float, float] = {}
    edits: dict[tuple[int, int], str] = {}
    started = False
    for m in NUM_TOKEN.finditer(response):
        value = parse_number(m.group(0))
        eq = result_at.get(m.start())
        if eq is not None and (started or eq is k):
            started = True
            if canon_expr(eq.expr) == forced_expr:
                new = forced
            else:  # re-evaluate with the already edited operands
                local = {(s - eq.expr_span[0], e - eq.expr_span[0]): t for (s, e), t in edits.items()
                         if eq.expr_span[0] <= s < eq.expr_span[1]}
                new = evaluate(_replace_spans(eq.expr, local))
            if new is not None and not close(new, eq.result):
                mapping[eq.result] = new
                edits[m.span()] = _fmt(new)
        elif started and value is not None:
            hit = next((v for k_, v in mapping.items() if close(value, k_)), None)
            if hit is not None:
                edits[m.span()] = _fmt(hit)
    new_label = next((v for k_, v in mapping.items() if close(label, k_)), None)
    if new_label is None or close(new_label, label):
        return None  # the answer does not depend on the step: not a label corruption
    return {**row, "response": _replace_spans(response, edits), "answer": _fmt(new_label)}


def corrupt_swap(row: dict[str, Any], label: float, rng: random.Random,
                 rows: list[dict[str, Any]], labels: list[float]) -> dict[str, Any] | None:
    """The response and answer of another row (with another answer) under this row's prompt."""
    for _ in range(5):
        j = rng.randrange(len(rows))
        if not close(labels[j], label) and rows[j].get("response") != row.get("response"):
            return {**row, "response": rows[j].get("response"), "answer": _fmt(labels[j])}
    return None


def negatives(rows: list[dict[str, Any]], labels: list[float], rng: random.Random) -> list[tuple[int, dict]]:
    """(source index, corrupted row) pairs, NEGATIVES_PER_ROW per row where a corruption applies."""
    pool = sorted(set(labels))
    out = []
    for i, (row, label) in enumerate(zip(rows, labels)):
        for _ in range(NEGATIVES_PER_ROW):
            family = rng.choice(("final", "step", "swap"))
            neg = None
            if family == "step":
                neg = corrupt_step(row, label, rng)
            elif family == "swap":
                neg = corrupt_swap(row, label, rng, rows, labels)
            if neg is None:
                neg = corrupt_final(row, label, rng, pool)
            out.append((i, neg))
    return out


# ---- the model, confident learning, weights ----------------------------------------------------

@dataclass
class NoiseResult:
    issues: set[int]
    """Indices (into the rows passed) flagged as label noise."""
    p_label: list[float]
    """Out-of-fold probability that each row's label is right (neutral for unjudged rows)."""
    hints: dict[int, str]
    """A human reason for each flagged row."""
    report: dict[str, Any] = field(default_factory=dict)


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int, seed: int,
                train: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold P(y=1) of a standardised, class-balanced logistic regression, folds drawn per
    group; only the samples where `train` is true (all by default) are fitted on."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = int(groups.max()) + 1
    fold_of = np.random.default_rng(seed).permutation(n_groups) % folds
    p = np.zeros(len(y))
    for f in range(folds):
        test = fold_of[groups] == f
        if not test.any():
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced"))
        fit = ~test if train is None else ~test & train
        model.fit(x[fit], y[fit])
        p[test] = model.predict_proba(x[test])[:, 1]
    return p


def detect_label_noise(rows: list[dict[str, Any]], cfg: FilterConfig) -> NoiseResult:
    """Flag rows whose final answer is probably wrong; give every row P(label is right)."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues
    from sklearn.metrics import roc_auc_score

    labels = [label_of(r) for r in rows]
    judged = [i for i, v in enumerate(labels) if v is not None]
    neutral = NoiseResult(set(), [1.0] * len(rows), {}, {"judged": len(judged), "fitted": False})
    if len(judged) < max(MIN_ROWS, 2 * cfg.folds):
        return neutral
    rng = random.Random(cfg.seed)
    sub = [rows[i] for i in judged]
    sub_labels = [labels[i] for i in judged]
    negs = negatives(sub, sub_labels, rng)
    samples = [(r.get("prompt"), r.get("response"), r.get("answer") if r.get("answer") is not None else _fmt(v))
               for r, v in zip(sub, sub_labels)]
    samples += [(r.get("prompt"), r.get("response"), r.get("answer")) for _, r in negs]
    feats = [features(*s) for s in samples]
    x = np.array([f[0] for f in feats], dtype=float)
    y = np.array([1] * len(sub) + [0] * len(negs))
    groups = np.array(list(range(len(sub))) + [i for i, _ in negs])
    p1 = out_of_fold(x, y, groups, cfg.folds, cfg.seed)
    pred_probs = np.column_stack([1 - p1, p1])
    issue_mask = find_label_issues(y, pred_probs, filter_by=cfg.noise_filter_by, n_jobs=1)
    flagged = [k for k in range(len(sub)) if issue_mask[k]]
    if flagged and REFIT:
        # prune and refit: the flagged originals leave the training folds, so the model learns
        # "original" from rows that look right and its p no longer scales with the noise rate
        train = np.ones(len(y), dtype=bool)
        train[flagged] = False
        p1 = out_of_fold(x, y, groups, cfg.folds, cfg.seed, train)
    p_label = [float("nan")] * len(rows)
    for k, i in enumerate(judged):
        p_label[i] = float(p1[k])
    fill = float(np.mean(p1[:len(sub)]))  # unjudged rows: the mean, i.e. weight about 1
    p_label = [fill if math.isnan(p) else p for p in p_label]
    report = {"judged": len(judged), "fitted": True, "negatives": len(negs),
              "model": "logistic_regression (class-balanced)", "filter_by": cfg.noise_filter_by,
              "oof_auc": round(float(roc_auc_score(y, p1)), 4), "flagged": len(flagged), "refit": bool(flagged and REFIT),
              "cl_estimated_issues": int(num_label_issues(y, pred_probs)),
              "corrupted_taken_for_original": int(issue_mask[len(sub):].sum()),
              "coefficients": dict(zip(FEATURES, _coefficients(x, y)))}
    return NoiseResult({judged[k] for k in flagged}, p_label, {judged[k]: feats[k][1] for k in flagged}, report)


def _coefficients(x: np.ndarray, y: np.ndarray) -> list[float]:
    """The standardised coefficients of the model fitted on everything (for the report)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaled = StandardScaler().fit_transform(x)
    model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced").fit(scaled, y)
    return [round(float(c), 3) for c in model.coef_[0]]


def normalized_weights(p: list[float], min_weight: float) -> list[float]:
    """max(min_weight, c * p_i), with c chosen so that the weights average exactly 1.

    Water-filling: the rows clipped at the floor are found by a fixed-point iteration (the
    clipped set only grows), then c spreads the remaining mass over the others."""
    if not p:
        return []
    arr = np.clip(np.asarray(p, dtype=float), 1e-9, None)
    n, clipped = len(arr), np.zeros(len(arr), dtype=bool)
    while True:
        free = ~clipped
        c = (n - clipped.sum() * min_weight) / arr[free].sum() if free.any() else 0.0
        now = clipped | (c * arr < min_weight)
        if (now == clipped).all():
            break
        clipped = now
    return [float(v) for v in np.where(clipped, min_weight, c * arr)]
