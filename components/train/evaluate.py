"""Evaluate every stage's model on held-out verifiable problems, side by side.

    distillery evaluate --checkpoint base=runs/base/model --checkpoint reinforce=runs/reinforce/model \\
        --checkpoint finetune=runs/finetune/model --data data/split --out runs/evaluate

Per stage: exact-match accuracy (greedy completion; the number after the answer marker equals
the reference answer, components/train/rewards.py), pass@1 as DeepSeek-R1 reports it (the mean
accuracy of `samples` completions per problem sampled at `temperature`), the format rate, and the
perplexity of the reference responses (exp of the mean cross-entropy over response tokens,
prompts excluded).
Writes metrics.json ({stage}_{measure}), stages.md (a table), stages.png (bars) and
completions.jsonl (what each stage answered). Completions run to eos, max_new_tokens or the
model's block_size; a problem whose prompt leaves fewer than 16 tokens of the block counts as
answered wrong (its completion is empty).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from components.artifacts import atomic_dir, finish
from components.console import Progress, log
from components.data.load import DataError, load_canonical
from components.train.config import EvaluateConfig
from components.train.rewards import accuracy_reward, format_reward, reference_answer


def problems(data: str | os.PathLike, cfg: EvaluateConfig) -> list[dict]:
    """The held-out rows with a verifiable answer: test.jsonl of a split folder, or a .jsonl file."""
    path = Path(data)
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: missing; give a split folder (with test.jsonl) or a .jsonl file of problems")
    rows = [r for r in load_canonical(path) if reference_answer(r, cfg.answer_marker) is not None]
    if not rows:
        raise DataError(f"{path}: no row with a verifiable answer to evaluate on")
    return rows[:cfg.max_rows] if cfg.max_rows else rows


@torch.no_grad()
def evaluate_model(model, tok, rows: list[dict], cfg: EvaluateConfig, batch: int = 16,
                   desc: str = "evaluate") -> tuple[dict, list[dict]]:
    """({accuracy, format, perplexity, rows}, per-row completions) of one model; progress as `desc`."""
    from components.train.grpo import token_logprobs
    from components.train.batches import encode_pairs

    correct = formatted = 0.0
    nll, count = 0.0, 0
    answers = []
    by_len: dict[int, list[int]] = {}
    prompts = [tok.prompt_ids(r.get("prompt") or "") for r in rows]
    pairs, starts = encode_pairs(rows, tok)
    from components.train.grpo import MIN_COMPLETION

    room = model.cfg.block_size - MIN_COMPLETION
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    completions: dict[int, str] = {}
    sampled: dict[int, list[str]] = {i: [] for i in range(len(rows))}
    g = torch.Generator().manual_seed(cfg.seed)
    k = cfg.samples
    bar = Progress(len(rows), desc, "problem")
    for length, members in by_len.items():  # same-length prompts decode together: no padding
        for start in range(0, len(members), batch):
            chunk = members[start:start + batch]
            if length == 0 or length > room:
                for i in chunk:
                    completions[i] = ""
                    sampled[i] = [""] * k
                continue
            budget = min(cfg.max_new_tokens, model.cfg.block_size - length)
            idx = torch.tensor([prompts[i] for i in chunk], dtype=torch.long)
            out = model.generate(idx, budget, temperature=0, eos_id=tok.eos_ids)
            for i, row in zip(chunk, out[:, length:].tolist()):
                completions[i] = tok.decode(tok.until_eos(row))
            if k:
                idx = torch.tensor([prompts[i] for i in chunk for _ in range(k)], dtype=torch.long)
                out = model.generate(idx, budget, temperature=cfg.temperature, eos_id=tok.eos_ids, generator=g)
                for j, row in enumerate(out[:, length:].tolist()):
                    sampled[chunk[j // k]].append(tok.decode(tok.until_eos(row)))
            bar.update(len(chunk))
    bar.close()
    pass1 = passk = 0.0
    for i, r in enumerate(rows):
        ref = reference_answer(r, cfg.answer_marker)
        if k:
            right = sum(accuracy_reward(t, ref, cfg.answer_marker) for t in sampled[i])
            pass1 += right / k
            passk += pass_at_k(k, int(right), k)
        text = completions[i]
        acc, fmt = accuracy_reward(text, ref, cfg.answer_marker), format_reward(text, cfg.answer_marker)
        correct += acc
        formatted += fmt
        answers.append({"id": r.get("id"), "reference": ref, "completion": text, "correct": bool(acc),
                        **({"samples": sampled[i]} if k else {})})
        full = pairs[i][:model.cfg.block_size + 1]
        if len(full) >= 2:  # the reference response's tokens, scored as the fine-tune loss scores them
            resp = token_logprobs(model, torch.tensor([full]), min(max(1, starts[i]), len(full) - 1))[0]
            nll -= float(resp.sum())
            count += resp.numel()
    n = len(rows)
    sampled_metrics = {"pass1": pass1 / n, **({f"pass{k}": passk / n} if k > 1 else {})} if k else {}
    result = {"accuracy": correct / n, **sampled_metrics, "format": formatted / n,
              "perplexity": math.exp(nll / count) if count else float("nan"), "rows": n}
    return result, answers


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code"): the chance that k of the n, drawn without
    replacement, hold at least one correct, 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c ({c}) <= n ({n}) and 1 <= k ({k}) <= n")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """The exact (binomial) McNemar test of two models' right/wrong answers to the same problems:
    (problems only `a` got right, problems only `b` got right, two-sided p-value that the two
    are equally often right). Only the discordant problems count; under the null each is `a`'s
    or `b`'s with chance 1/2."""
    if len(a) != len(b):
        raise ValueError(f"mcnemar: {len(a)} and {len(b)} answers; the test pairs answers to the same problems")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n, low = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 0, 0, 1.0
    tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    return only_a, only_b, min(1.0, 2 * tail)


def run(cfg: EvaluateConfig, stages: dict[str, str | os.PathLike], data: str | os.PathLike,
        out_dir: str | os.PathLike) -> dict[str, Any]:
    from components.model.folder import load_model

    if not stages:
        raise DataError("evaluate: give at least one --checkpoint NAME=MODEL_FOLDER")
    rows = problems(data, cfg)
    results, completions = {}, []
    for name, folder in stages.items():
        model, tok = load_model(folder)
        results[name], answers = evaluate_model(model, tok, rows, cfg, desc=f"evaluate {name}")
        completions += [{"stage": name, **a} for a in answers]
        pass1 = f", pass@1 {results[name]['pass1']:.3f}" if "pass1" in results[name] else ""
        passk = [key for key in results[name] if key.startswith("pass") and key != "pass1"]
        pass1 += "".join(f", pass@{key[4:]} {results[name][key]:.3f}" for key in passk)
        log.info(f"evaluate: {name}: accuracy {results[name]['accuracy']:.3f}{pass1}, format {results[name]['format']:.3f}, "
              f"perplexity {results[name]['perplexity']:.3f} on {len(rows)} problems")
    metrics = {f"{name}_{k}": v for name, r in results.items() for k, v in r.items() if k != "rows"}
    metrics["problems"] = len(rows)
    with atomic_dir(Path(out_dir), inputs=tuple(stages.values())) as tmp:
        with open(tmp / "completions.jsonl", "w", encoding="utf-8") as f:
            for c in completions:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
        (tmp / "stages.md").write_text(table(results), encoding="utf-8")
        plot(results, tmp / "stages.png")
        finish(tmp, "evaluate", {name: Path(folder) / "model.safetensors" for name, folder in stages.items()},
               {"evaluate": cfg.__dict__, "stages": {k: str(v) for k, v in stages.items()}}, metrics,
               {"table": tmp / "stages.md", "completions": tmp / "completions.jsonl"})
    return metrics


def table(results: dict[str, dict]) -> str:
    k = next((key[4:] for r in results.values() for key in r if key.startswith("pass") and key != "pass1"), "k")
    lines = [f"| stage | accuracy (greedy) | pass@1 (sampled) | pass@{k} | format | perplexity (responses) | problems |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        pass1 = f"{r['pass1']:.3f}" if "pass1" in r else "-"
        passk = f"{r[f'pass{k}']:.3f}" if f"pass{k}" in r else "-"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {pass1} | {passk} | {r['format']:.3f} | {r['perplexity']:.3f} "
                     f"| {r['rows']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(names))
    sampled = [key for key in results[names[0]] if key.startswith("pass")]
    bars = ["accuracy", *[key for key in sampled if all(key in results[n] for n in names)], "format"]
    w = 0.8 / len(bars)
    for j, key in enumerate(bars):
        a.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], [results[n][key] for n in names], w,
              label={"accuracy": "accuracy (greedy)", "pass1": "pass@1 (sampled)"}.get(
                  key, f"pass@{key[4:]}" if key.startswith("pass") else key))
    a.set_xticks(list(x), names)
    a.set_ylim(0, 1)
    a.set_title("held-out problems")
    a.legend()
    b.bar(list(x), [results[n]["perplexity"] for n in names], color="tab:gray")
    b.set_xticks(list(x), names)
    b.set_title("perplexity of reference responses")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
