"""Typed configs of the data steps: source (loader), generate, validate, filter, split.

Each is filled from the section of the same name in params.yaml (see pipelines/params.py);
every field has its default here and a docstring under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import require

FORMATS = ("auto", "jsonl", "parquet", "csv", "text")


@dataclass
class SourceConfig:
    """How raw records map onto the canonical row (id, prompt, response, answer)."""

    format: str = "auto"
    """One of auto, jsonl, parquet, csv, text; auto picks by file suffix."""
    fields: dict[str, str] = field(
        default_factory=lambda: {"id": "id", "prompt": "prompt", "response": "response", "answer": "answer"}
    )
    """Canonical name -> source column. `prompt` and `response` are required; `id` and `answer`
    may be left out: the id is then a hash of the content, the answer is read after the marker."""
    keep_columns: list[str] = field(default_factory=list)
    """Further columns carried through unchanged when a record has them (e.g. `weight`)."""
    answer_marker: str = "####"
    """The final answer is the text after the last occurrence of this marker in the response."""
    strict_columns: bool = True
    """Refuse records with columns that the mapping does not name (an extra column is an error)."""
    max_record_bytes: int = 1_000_000
    """A single record (line) larger than this is refused: it is almost surely not a sample."""
    text_chunk_chars: int = 256
    """Plain-text sources: the corpus is cut into chunks of this many characters, one row each."""

    def check(self) -> None:
        require(self.format in FORMATS, f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        unknown = set(self.fields) - {"id", "prompt", "response", "answer"}
        require(not unknown, f"fields: unknown canonical names {sorted(unknown)}")
        require({"prompt", "response"} <= set(self.fields), "fields: 'prompt' and 'response' must be mapped")
        require(self.max_record_bytes > 0, "max_record_bytes: must be positive")
        require(self.text_chunk_chars > 0, "text_chunk_chars: must be positive")


HELD_OUT_KINDS = ("wrong_operation", "misread_operand")
"""Noise kinds that the label-noise detector does not imitate; weight 0 in the default mix."""
NOISE_KINDS = ("wrong_answer", "exact_duplicate", "near_duplicate", "empty", "garbage", "broken_field",
               *HELD_OUT_KINDS)
"""Every noise kind components/data/generate.py can inject."""

MAX_GENERATE_ROWS = 5_000_000
"""The most rows `data generate` writes (about 1.5 GB of JSON lines); real data comes in by ingest."""


@dataclass
class GenerateConfig:
    """The synthetic sample set: verifiable arithmetic word problems with injected noise."""

    rows: int = 2000
    """Rows to write, noise included."""
    noise: float = 0.2
    """Fraction of the rows that are injected noise (0 to 0.9)."""
    seed: int = 0
    """The same seed, rows and noise give the same file, byte for byte."""
    max_ops: int = 3
    """Problems use 1 to max_ops arithmetic operations (the difficulty spread)."""
    max_number: int = 60
    """The largest starting count (added amounts go up to 5/6 of it). Smaller numbers mean fewer
    distinct arithmetic facts, which a small model learns from fewer rows."""
    noise_kinds: dict[str, float] = field(
        default_factory=lambda: {
            "wrong_answer": 0.35,
            "exact_duplicate": 0.15,
            "near_duplicate": 0.15,
            "empty": 0.1,
            "garbage": 0.1,
            "broken_field": 0.15,
        }
    )
    """Relative weights of the noise kinds. The held-out kinds (wrong_operation, misread_operand;
    see components/data/generate.py) are absent, i.e. weight 0, so that the default mix and the
    cleaning floor measured on it mean what they did; name them here to generate them."""

    def check(self) -> None:
        require(0 < self.rows <= MAX_GENERATE_ROWS, f"rows: {self.rows} is outside 1..{MAX_GENERATE_ROWS:,}")
        require(0.0 <= self.noise <= 0.9, f"noise: {self.noise} is outside [0, 0.9]")
        require(1 <= self.max_ops <= 6, "max_ops: must be within 1..6")
        require(3 <= self.max_number <= 10_000, "max_number: must be within 3..10000")
        unknown = set(self.noise_kinds) - set(NOISE_KINDS)
        require(not unknown, f"noise_kinds: unknown kinds {sorted(unknown)}; known: {', '.join(NOISE_KINDS)}")
        require(all(w >= 0 for w in self.noise_kinds.values()), "noise_kinds: weights must be >= 0")
        require(self.noise == 0 or sum(self.noise_kinds.values()) > 0, "noise_kinds: all weights are zero")


@dataclass
class ValidateConfig:
    """The Great Expectations suite and the gate built from it."""

    prompt_chars: list[int] = field(default_factory=lambda: [10, 4000])
    """Allowed prompt length in characters, [min, max]."""
    response_chars: list[int] = field(default_factory=lambda: [2, 8000])
    """Allowed response length in characters, [min, max]."""
    max_quarantine_fraction: float = 0.5
    """The gate fails when more than this fraction of rows fail a row-level expectation."""
    max_duplicate_fraction: float = 0.5
    """The gate fails when more than this fraction of prompts are exact repeats."""
    mean_prompt_chars: list[float] = field(default_factory=lambda: [20.0, 2000.0])
    """Distribution check: the mean prompt length of the batch must lie in [min, max]."""
    min_rows: int = 1
    """The gate fails on a batch with fewer rows than this."""
    data_docs: bool = True
    """Write the Great Expectations Data Docs HTML site into the output folder."""

    def check(self) -> None:
        for name in ("prompt_chars", "response_chars", "mean_prompt_chars"):
            lo_hi = getattr(self, name)
            require(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1], f"{name}: expected [min, max] with 0 <= min <= max")
        require(0 <= self.max_quarantine_fraction <= 1, "max_quarantine_fraction: must be within [0, 1]")
        require(0 <= self.max_duplicate_fraction <= 1, "max_duplicate_fraction: must be within [0, 1]")
        require(self.min_rows >= 1, "min_rows: must be at least 1")


@dataclass
class FilterConfig:
    """De-duplication, heuristic quality filters, label-noise detection and sample weights."""

    near_dup_threshold: float = 0.7
    """Estimated Jaccard similarity of word shingles above which a row is a near-duplicate."""
    shingle_words: int = 3
    """Words per shingle for near-duplicate detection."""
    num_perm: int = 128
    """MinHash permutations (more is more exact and slower)."""
    near_dup_same_numbers: bool = True
    """A near-duplicate must also carry the same numbers as the row it repeats (as a multiset):
    in math data a problem with other numbers is another question with another answer, even
    when only one word differs. Set false for plain text, where numbers are incidental."""
    min_words: int = 3
    """Quality: prompts with fewer words are dropped."""
    max_words: int = 1000
    """Quality: prompts with more words are dropped."""
    min_alpha_word_fraction: float = 0.6
    """Quality: at least this fraction of the prompt's words must be alphabetic."""
    max_symbol_fraction: float = 0.15
    """Quality: at most this fraction of the prompt's characters may be symbols (not letter,
    digit, space or common punctuation)."""
    max_char_repeat: int = 10
    """Quality: a run of the same character longer than this marks garbage."""
    label_noise: bool = True
    """Detect wrong labels by confident learning with a small proxy model."""
    folds: int = 5
    """Cross-validation folds for the proxy model's out-of-fold probabilities."""
    noise_filter_by: str = "predicted_neq_given"
    """cleanlab's find_label_issues method: predicted_neq_given (flag a row when the proxy finds
    it likelier corrupted than original), or the stricter confident-learning ones
    prune_by_noise_rate, prune_by_class, both, confident_learning (fewer flags, lower recall;
    see components/data/noise.py)."""
    drop_below: float = 0.2
    """A row flagged as label noise is dropped only when the proxy's out-of-fold probability that
    its answer is right is below this; a flagged row at or above it is kept, down-weighted by
    that same low probability, and counted as `flagged_kept_downweighted` in the report. 0.5 (or
    more) drops every flagged row. The default is measured (benchmarks/filter_quality.py): on
    generated data almost every wrong answer sits below 0.05, while the correct GSM8K rows the
    proxy doubts spread up to 0.5."""
    min_weight: float = 0.1
    """Sample weights (proxy confidence, normalised to mean 1) are clipped below at this."""
    seed: int = 0
    """Seed of the MinHash permutations and the proxy model."""

    def check(self) -> None:
        require(0 < self.near_dup_threshold <= 1, "near_dup_threshold: must be within (0, 1]")
        require(self.shingle_words >= 1, "shingle_words: must be at least 1")
        require(self.num_perm >= 16, "num_perm: must be at least 16")
        require(0 <= self.min_words <= self.max_words, "min_words/max_words: need 0 <= min_words <= max_words")
        require(0 <= self.min_alpha_word_fraction <= 1, "min_alpha_word_fraction: must be within [0, 1]")
        require(0 <= self.max_symbol_fraction <= 1, "max_symbol_fraction: must be within [0, 1]")
        require(self.folds >= 2, "folds: must be at least 2")
        methods = ("predicted_neq_given", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning")
        require(self.noise_filter_by in methods, f"noise_filter_by: {self.noise_filter_by!r} is not one of "
                f"{', '.join(methods)}")
        require(0 <= self.drop_below <= 1, "drop_below: must be within [0, 1]")
        require(0 < self.min_weight <= 1, "min_weight: must be within (0, 1]")


@dataclass
class SplitConfig:
    """Deterministic train / val / test assignment by a hash of the row id."""

    val_fraction: float = 0.05
    """Fraction of rows in the validation split."""
    test_fraction: float = 0.1
    """Fraction of rows in the test split."""
    salt: str = "distillery"
    """Mixed into the hash; change it to draw a different split of the same rows."""

    def check(self) -> None:
        require(0 <= self.val_fraction < 1, "val_fraction: must be within [0, 1)")
        require(0 <= self.test_fraction < 1, "test_fraction: must be within [0, 1)")
        require(self.val_fraction + self.test_fraction < 1, "val_fraction + test_fraction must be below 1")
