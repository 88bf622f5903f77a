"""Synthetic, verifiable arithmetic word problems with injected noise and its ground truth.

    distillery data generate --out data/sample/raw.jsonl --rows 2000 --noise 0.2 --seed 0

Each clean row is a short story of 1..max_ops operations on a count of things, a worked response
in GSM8K's style (`<<a+b=c>>` calculator marks, final line `#### <answer>`), and the answer.
A fraction `noise` of the rows is noise of several kinds, and `<out>.truth.jsonl` says for every
row whether it is noise and of which kind, so the validator and the filters can be measured:

- wrong_answer: the final answer is wrong (changed at the end, an intermediate step miscomputed
  and carried through, or the answer of another problem);
- exact_duplicate: a copy of an earlier row (verbatim, or differing in case and spacing only);
- near_duplicate: an earlier row with a word or two changed;
- empty: empty or whitespace-only prompt or response, or a null;
- garbage: random characters, mojibake or a repeated-character run instead of text;
- broken_field: an answer that is no number, a response without its `####` line, or an answer
  field that disagrees with the response.

Two more kinds are HELD OUT: selectable (`noise_kinds`), but weight 0 in the default mix, and
unlike wrong_answer not imitated by the label-noise detector's self-supervised corruptions
(components/data/noise.py), so they measure how it does on errors it was not built around
(benchmarks/filter_quality.py prints them apart):

- wrong_operation: one step of the worked solution applies the wrong operation ("buys 5 more"
  worked as 12 - 5 = 7, with the matching step words), every equation arithmetically right and
  carried to a consistent final line and answer field: a reasoning error no arithmetic check sees;
- misread_operand: one number of the story is copied wrong into the solution (digits swapped,
  or off by a little), everything computed correctly from it.

The same seed, rows, noise and kinds give the same bytes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from components.config import ConfigError
from components.data.config import HELD_OUT_KINDS, NOISE_KINDS, GenerateConfig

NAMES = ["Alice", "Bob", "Carmen", "Deepak", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kemi", "Liam", "Mei", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "shells", "cards",
         "stamps", "cookies", "buttons", "beads", "tickets", "plums", "candles"]
FRIENDS = ["her cousin", "a neighbour", "his sister", "a classmate", "the teacher", "a friend"]

# op -> phrasings; {n} is the operand, {name}, {item}, {friend} the story's words
PHRASES = {
    "+": ["{name} buys {n} more {item}.", "{name} finds {n} more {item} in a drawer.",
          "{friend} gives {name} {n} {item}."],
    "-": ["{name} gives {n} {item} to {friend}.", "{name} loses {n} {item} on the way home.",
          "{name} sells {n} of the {item}."],
    "*": ["{name} ends up with {n} times as many {item} after a lucky trade.",
          "Every one of the {item} is swapped for {n} new ones."],
    "/": ["{name} splits the {item} into {n} equal piles and keeps one pile.",
          "{name} shares the {item} equally with friends, {n} people in all, and keeps one share."],
}
STEP_WORDS = {"+": "adds", "-": "takes away", "*": "multiplies by", "/": "divides by"}


@dataclass
class Problem:
    prompt: str
    response: str
    answer: str
    steps: list[tuple[int, str, int, int]]  # (left, op, right, result)


def make_problem(rng: random.Random, max_ops: int, max_number: int = 60) -> Problem:
    """A problem of 1..max_ops steps from a count of 2..max_number; an added amount is at most
    5/6 of max_number (a taken amount, a factor 2..5 or a divisor 2..9 depend on the count)."""
    name, item, friend = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(FRIENDS)
    start = rng.randint(2, max_number)
    add_max, fallback_add = max(1, max_number * 5 // 6), max(1, max_number // 3)
    cur, sentences, steps = start, [], []
    for _ in range(rng.randint(1, max_ops)):
        op = rng.choice("+-*/" if cur < 500 else "-/")
        if op == "+":
            n = rng.randint(1, add_max)
            new = cur + n
        elif op == "-":
            if cur < 2:
                op, n = "+", rng.randint(1, fallback_add)
                new = cur + n
            else:
                n = rng.randint(1, cur - 1)
                new = cur - n
        elif op == "*":
            n = rng.randint(2, 5)
            new = cur * n
        else:
            divisors = [d for d in range(2, 10) if cur % d == 0]
            if not divisors:
                op, n = "+", rng.randint(1, fallback_add)
                new = cur + n
            else:
                n = rng.choice(divisors)
                new = cur // n
        sentence = rng.choice(PHRASES[op]).format(n=n, name=name, item=item, friend=friend)
        sentences.append(sentence[0].upper() + sentence[1:])
        steps.append((cur, op, n, new))
        cur = new
    prompt = f"{name} has {start} {item}. " + " ".join(sentences) + f" How many {item} does {name} have now?"
    return Problem(prompt, render_response(name, item, start, steps), str(cur), steps)


_INTEGER = re.compile(r"\d+")


def operands(prompt: str) -> tuple[int, ...]:
    """The numbers of a problem's story in order (the start, then each step's operand): its
    operand combination, whatever the names, items and phrasings around them."""
    return tuple(int(x) for x in _INTEGER.findall(prompt or ""))


def unseen_problems(n: int, seen_prompts: list[str], seed: int, max_ops: int, max_number: int,
                    max_tries: int = 200) -> list[dict]:
    """`n` distinct clean problems (id, prompt, response, answer) whose operand combination never
    occurs among `seen_prompts` (a training set's prompts): a held-out set that measures more than
    recall of memorised problems. Raises ValueError when max_tries * n draws do not find n."""
    rng = random.Random(seed)
    seen = {operands(q) for q in seen_prompts}
    rows: list[dict] = []
    for _ in range(max_tries * max(n, 1)):
        if len(rows) >= n:
            break
        p = make_problem(rng, max_ops, max_number)
        key = operands(p.prompt)
        if key not in seen:
            seen.add(key)  # and distinct among themselves
            rows.append({"id": f"heldout-{seed}-{len(rows):05d}", "prompt": p.prompt, "response": p.response,
                         "answer": p.answer})
    if len(rows) < n:
        raise ValueError(f"unseen_problems: found only {len(rows)} of {n} problems whose operands are unseen "
                         f"(max_ops {max_ops}, max_number {max_number}): ask for fewer, or allow more operations")
    return rows


def render_response(name: str, item: str, start: int, steps: list[tuple[int, str, int, int]]) -> str:
    lines = [f"{name} starts with {start} {item}."]
    for left, op, right, result in steps:
        lines.append(f"{name} {STEP_WORDS[op]} {right}: {left} {op} {right} = <<{left}{op}{right}={result}>>{result}.")
    lines.append(f"#### {steps[-1][3]}")
    return "\n".join(lines)


def _story_words(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    return words[0], words[3].rstrip(".")  # "{name} has {start} {item}."


# ---- noise ------------------------------------------------------------------------------------

def _wrong_answer(rng: random.Random, p: Problem, other: Problem) -> tuple[dict, str]:
    how = rng.random()
    if 0.4 <= how < 0.8:  # an intermediate step miscomputed, the error carried to the end
        k = rng.randrange(len(p.steps))
        steps, carried = [], None
        for i, (left, op, right, result) in enumerate(p.steps):
            if carried is not None:
                left = carried
                result = {"+": left + right, "-": left - right, "*": left * right}.get(op, left // right if right else left)
            if i == k:
                result += rng.choice([-1, 1]) * rng.randint(1, 9)
            steps.append((left, op, right, result))
            carried = result
        if str(steps[-1][3]) != p.answer:  # a later floor division can swallow the error
            name, item = _story_words(p.prompt)
            response = render_response(name, item, p.steps[0][0], steps)
            return {"prompt": p.prompt, "response": response, "answer": str(steps[-1][3])}, f"step {k + 1} miscomputed"
    elif how >= 0.8 and other.answer != p.answer:
        return {"prompt": p.prompt, "response": other.response, "answer": other.answer}, "answer of another problem"
    # the final answer is off; also the fallback when a wrong answer above came out right after all
    true = int(p.answer)
    wrong = true + rng.choice([-1, 1]) * rng.randint(1, max(3, true // 3 + 1))
    response = p.response.rsplit("####", 1)[0] + f"#### {wrong}"
    return {"prompt": p.prompt, "response": response, "answer": str(wrong)}, "final answer changed"


OTHER_OPS = {"+": "-*/", "-": "+*/", "*": "+-/", "/": "*-+"}


def _apply(left: int, op: str, right: int) -> int | None:
    """The exact, positive result of one step; None when there is none (an uneven division)."""
    if op == "/":
        return left // right if right and left % right == 0 and left >= right else None
    value = {"+": left + right, "-": left - right, "*": left * right}[op]
    return value if value > 0 else None


def _rework(p: Problem, k: int, op: str | None = None, right: int | None = None,
            start: int | None = None) -> list[tuple[int, str, int, int]] | None:
    """The steps of `p` with step k's operation or operand (or the start) replaced and every later
    step recomputed from it; None when a step has no exact positive result or the answer is unchanged."""
    steps, cur = [], p.steps[0][0] if start is None else start
    for i, (_, o, r, _) in enumerate(p.steps):
        if i == k:
            o, r = op or o, r if right is None else right
        result = _apply(cur, o, r)
        if result is None:
            return None
        steps.append((cur, o, r, result))
        cur = result
    return steps if str(cur) != p.answer else None


def _held_out(rng: random.Random, p: Problem, kind: str) -> tuple[dict, str] | None:
    """A wrong_operation or misread_operand row: consistent, arithmetically right, wrongly answered;
    None when no step of `p` admits one (a misread of `7 / 7` or `2 - 1` that still divides or
    stays positive), and the caller draws another problem."""
    name, item = _story_words(p.prompt)
    order = list(range(len(p.steps)))
    rng.shuffle(order)
    for k in order:
        left, op, right, _ = p.steps[k]
        if kind == "wrong_operation":
            for new_op in rng.sample(OTHER_OPS[op], 3):
                steps = _rework(p, k, op=new_op)
                if steps:
                    detail = f"step {k + 1} applies {new_op} instead of {op}"
                    return {"prompt": p.prompt, "response": render_response(name, item, steps[0][0], steps),
                            "answer": str(steps[-1][3])}, detail
        else:
            misread_start = k == 0 and rng.random() < 0.3
            old = left if misread_start else right
            if old < 2:
                continue
            swapped = int(str(old)[::-1]) if old >= 10 and str(old) != str(old)[::-1] else None
            for new in ([swapped] if swapped else []) + [old + d for d in rng.sample((-3, -2, -1, 1, 2, 3), 6)]:
                if new < 1 or new == old:
                    continue
                steps = _rework(p, k, start=new) if misread_start else _rework(p, k, right=new)
                if steps:
                    detail = f"{'start' if misread_start else f'step {k + 1}'} uses {new} for {old} from the story"
                    return {"prompt": p.prompt, "response": render_response(name, item, steps[0][0], steps),
                            "answer": str(steps[-1][3])}, detail
    return None


def _near_duplicate(rng: random.Random, row: dict) -> tuple[dict, str]:
    prompt = row["prompt"]
    how = rng.random()
    if how < 0.34:
        prompt = prompt.replace(" How many", " Now, how many", 1)
        detail = "filler word added"
    elif how < 0.67:
        prompt = prompt.replace(" has ", " owns ", 1)
        detail = "verb swapped"
    else:
        prompt = prompt.replace(".", "!", 1).replace(" now?", " at the end?", 1)
        detail = "punctuation and ending changed"
    return {**row, "prompt": prompt}, detail


def _empty(rng: random.Random, row: dict) -> tuple[dict, str]:
    field = rng.choice(["prompt", "response"])
    value = rng.choice(["", "   ", "\n\t ", None])
    return {**row, field: value}, f"{field} empty ({value!r})"


def _garbage(rng: random.Random, row: dict) -> tuple[dict, str]:
    how = rng.random()
    if how < 0.4:
        alphabet = "qwrtzpsdfghjklxcvbnm#$%&*@!~^0123456789"
        text = "".join(rng.choice(alphabet + " ") for _ in range(rng.randint(30, 120)))
        detail = "random characters"
    elif how < 0.7:
        text = row["prompt"].encode("utf-8").decode("latin-1").replace("a", "Ã¤").replace("e", "Ã©")
        text = "".join(ch if rng.random() > 0.3 else "\ufffd" for ch in text)
        detail = "mojibake"
    else:
        text = rng.choice("a!x?") * rng.randint(40, 200)
        detail = "repeated character"
    return {**row, "prompt": text}, detail


def _broken_field(rng: random.Random, row: dict) -> tuple[dict, str]:
    how = rng.random()
    if how < 0.35:
        return {**row, "answer": rng.choice(["N/A", "twelve", "?", "see above"])}, "answer is no number"
    if how < 0.7:
        return {**row, "response": row["response"].rsplit("\n####", 1)[0]}, "response has no #### line"
    return {**row, "answer": str(int(row["answer"]) + rng.randint(1, 20))}, "answer field disagrees with response"


def generate(cfg: GenerateConfig) -> tuple[list[dict], list[dict]]:
    """(rows, truth): `cfg.rows` rows and, for each, {id, noise, kind, detail}."""
    rng = random.Random(cfg.seed)
    n_noise = min(round(cfg.rows * cfg.noise), cfg.rows - 1)  # one clean row at least: duplicates need an original
    kinds = [k for k in NOISE_KINDS if cfg.noise_kinds.get(k, 0) > 0]
    weights = [cfg.noise_kinds[k] for k in kinds]
    noise_plan = rng.choices(kinds, weights=weights, k=n_noise) if n_noise else []
    n_clean = cfg.rows - n_noise

    clean, seen, misses = [], set(), 0
    while len(clean) < n_clean:
        p = make_problem(rng, cfg.max_ops, cfg.max_number)
        if p.prompt not in seen:  # clean rows are distinct problems
            seen.add(p.prompt)
            clean.append(p)
            misses = 0
        else:
            misses += 1
            if misses > 10_000:  # the space of distinct problems is (nearly) exhausted
                raise ConfigError(f"generate.rows: found only {len(clean):,} distinct problems of the {n_clean:,} "
                                  f"clean rows asked for with max_ops={cfg.max_ops}, max_number={cfg.max_number}; "
                                  f"ask for fewer rows, or raise max_number or max_ops")
    spare = [make_problem(rng, cfg.max_ops, cfg.max_number) for _ in range(max(1, n_noise))]  # sources for noise

    entries: list[tuple[dict, dict]] = [
        ({"prompt": p.prompt, "response": p.response, "answer": p.answer},
         {"noise": False, "kind": None, "detail": None}) for p in clean]
    for i, kind in enumerate(noise_plan):
        source = spare[i % len(spare)]
        base = {"prompt": source.prompt, "response": source.response, "answer": source.answer}
        if kind in ("exact_duplicate", "near_duplicate") and entries:
            pos = rng.randrange(len(entries))
            original, _ = entries[pos]
            if original["prompt"] is None or original["response"] is None:
                original = {"prompt": clean[0].prompt, "response": clean[0].response, "answer": clean[0].answer}
                pos = 0
            if kind == "exact_duplicate":
                row = dict(original)
                if rng.random() < 0.5:
                    row["prompt"] = "  " + row["prompt"].upper().replace(" ", "  ") + " "
                    detail = "copy differing in case and spacing"
                else:
                    detail = "verbatim copy"
            else:
                row, detail = _near_duplicate(rng, original)
            insert_at = rng.randint(pos + 1, len(entries))  # always after its original
        else:
            if kind == "wrong_answer":
                row, detail = _wrong_answer(rng, source, rng.choice(clean) if clean else source)
            elif kind in HELD_OUT_KINDS:
                made = _held_out(rng, source, kind)
                while made is None:
                    made = _held_out(rng, make_problem(rng, cfg.max_ops, cfg.max_number), kind)
                row, detail = made
            else:
                row, detail = {"empty": _empty, "garbage": _garbage, "broken_field": _broken_field}[kind](rng, base)
            insert_at = rng.randint(0, len(entries))
        entries.insert(insert_at, (row, {"noise": True, "kind": kind, "detail": detail}))

    width = max(6, len(str(cfg.rows)))
    rows, truth = [], []
    for i, (row, t) in enumerate(entries):
        rid = f"syn-{cfg.seed}-{i:0{width}d}"
        rows.append({"id": rid, "prompt": row["prompt"], "response": row["response"], "answer": row["answer"]})
        truth.append({"id": rid, **t})
    return rows, truth


def truth_path(out: str | Path) -> Path:
    """Where the ground truth of a generated file lives: beside it, `<stem>.truth.jsonl`."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".truth.jsonl")


def run(cfg: GenerateConfig, out: str | Path) -> dict:
    """The `generate` step: write `out`, its truth file and its manifest, each whole.

    The three files are made in a temporary folder beside `out` and renamed into place, the
    manifest last, so a reader never sees a half-written file.
    """
    import os
    import shutil
    import tempfile
    from collections import Counter

    from components.artifacts import OutputError, manifest, write_json
    from components.config import to_dict
    from components.data.load import write_jsonl

    out = Path(out)
    for target in (out, truth_path(out), manifest_path(out)):
        if target.exists() and not target.is_file():
            raise OutputError(f"{target}: is a folder or special file; --out names the .jsonl file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, truth = generate(cfg)
    kinds = Counter(t["kind"] for t in truth if t["noise"])
    metrics = {"rows": len(rows), "noise_rows": sum(kinds.values()),
               **{f"noise_{k}": v for k, v in sorted(kinds.items())}}
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = {"rows": stage / out.name, "truth": stage / truth_path(out).name}
        write_jsonl(files["rows"], rows)
        write_jsonl(files["truth"], truth)
        man = stage / manifest_path(out).name
        write_json(man, manifest("generate", {}, to_dict(cfg), metrics, files))
        for f in (*files.values(), man):
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return metrics


def manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".manifest.json")
