"""Exact and near-duplicate removal: the first of the `filter` step's passes.

    from components.data.dedup import exact_duplicates, near_duplicates
    dups = exact_duplicates(rows)                 # {index: index of the row it repeats}
    near = near_duplicates(rows, FilterConfig())  # {index: (index it repeats, jaccard)}

Both keep the first occurrence and name, for every later copy, the kept row it repeats.

- Exact: rows whose normalized prompt AND normalized response are equal (normalization:
  Unicode NFKC, casefold, whitespace runs collapsed to one space, stripped), so copies that
  differ in case or spacing only are caught.
- Near: MinHash signatures (datasketch, `num_perm` permutations, `seed`) of the set of
  `shingle_words`-word shingles of the normalized PROMPT, indexed in a MinHashLSH. Departure
  from the plain recipe: the LSH index is built for a threshold a little BELOW
  `near_dup_threshold` so that it proposes generously (few false negatives), and every candidate
  is then confirmed by the exact Jaccard similarity of the two shingle sets, so what is removed
  is exactly "Jaccard >= near_dup_threshold" and not subject to the MinHash estimate's noise.
  With `near_dup_same_numbers` (the default) the two prompts must also hold the same numbers:
  "Liam has 20 stamps..." and "Liam has 45 stamps..." share 75 % of their shingles but are two
  problems with two answers, and on generated template data this removes every such false
  positive while losing no true near-duplicate. Rows are visited in order and only kept rows
  enter the index, so a near-duplicate always points at a row that survives. Prompts with no word at all are skipped here (the quality
  filters drop them).

Words are runs of Unicode word characters (`\\w+`), so punctuation does not split a shingle
("stickers." and "stickers!" are the same word); numbers are words, since in a math problem
"3 apples" and "4 apples" are different questions.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from components.data.config import FilterConfig

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")

LSH_SLACK = 0.15
"""The LSH index proposes pairs down to near_dup_threshold - LSH_SLACK; exact Jaccard decides."""


def normalize(text: str | None) -> str:
    """NFKC, casefold, whitespace collapsed to single spaces, stripped; None reads as "".

    The one normalization of the data steps: exact duplicates here, shingles for near ones,
    and the validator's duplicate-rate column all compare texts through it."""
    if not text:
        return ""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_duplicates(rows: Sequence[dict[str, Any]]) -> dict[int, int]:
    """{index of a later copy: index of the first row with the same normalized prompt+response}."""
    first: dict[tuple[str, str], int] = {}
    dups: dict[int, int] = {}
    for i, row in enumerate(rows):
        key = (normalize(row.get("prompt")), normalize(row.get("response")))
        if key in first:
            dups[i] = first[key]
        else:
            first[key] = i
    return dups


def shingles(text: str | None, k: int) -> set[str]:
    """The set of k-word shingles of the normalized text (the whole text when it has < k words)."""
    words = _WORD.findall(normalize(text))
    if not words:
        return set()
    if len(words) <= k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def number_signature(text: str | None) -> tuple[str, ...]:
    """The numbers written in the text as strings, sorted (a multiset), thousands separators
    dropped: two near-duplicate prompts must have the same signature. (Not equations.numbers,
    which reads values, in order, for arithmetic.)"""
    return tuple(sorted(n.replace(",", "") for n in _NUMBER.findall(normalize(text))))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(rows: Sequence[dict[str, Any]], cfg: FilterConfig,
                    progress: bool = True) -> dict[int, tuple[int, float]]:
    """{index of a near-duplicate: (index of the earlier kept row it repeats, exact Jaccard)}."""
    from datasketch import MinHash, MinHashLSH
    from tqdm import tqdm

    sets = [shingles(row.get("prompt"), cfg.shingle_words) for row in rows]
    nums = [number_signature(row.get("prompt")) if cfg.near_dup_same_numbers else () for row in rows]
    encoded = [[s.encode("utf-8") for s in sorted(sh)] for sh in sets]
    lsh_threshold = max(0.05, cfg.near_dup_threshold - LSH_SLACK)
    lsh = MinHashLSH(threshold=lsh_threshold, num_perm=cfg.num_perm)
    hashes = MinHash.generator(encoded, num_perm=cfg.num_perm, seed=cfg.seed)
    found: dict[int, tuple[int, float]] = {}
    bar = tqdm(hashes, total=len(rows), desc="filter: minhash", unit="row", leave=False,
               disable=not progress, mininterval=0.5)
    for i, mh in enumerate(bar):
        if not sets[i]:
            continue
        best: tuple[float, int] | None = None
        for j in lsh.query(mh):
            if nums[i] != nums[j]:
                continue
            sim = jaccard(sets[i], sets[j])
            if sim >= cfg.near_dup_threshold and (best is None or (sim, -j) > (best[0], -best[1])):
                best = (sim, j)
        if best is None:
            lsh.insert(i, mh)
        else:
            found[i] = (best[1], best[0])
    bar.close()
    return found
