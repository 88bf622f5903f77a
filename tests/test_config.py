"""Strict config loading: unknown keys, wrong types, nested sections, check() errors, round trips."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import ConfigError, deep_merge, from_dict, to_dict
from components.data.config import (
    FilterConfig,
    GenerateConfig,
    SourceConfig,
    SplitConfig,
    ValidateConfig,
)
from components.data.generate import NOISE_KINDS


@dataclass
class Inner:
    size: int = 4
    ratio: float = 0.5
    tags: list[str] = field(default_factory=list)
    limit: int | None = None

    def check(self) -> None:
        if self.size < 1:
            raise ConfigError("size: must be at least 1")


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    filter: FilterConfig = field(default_factory=FilterConfig)


def error(cls, data, where: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data, where)
    return str(info.value)


# ---- unknown keys ------------------------------------------------------------------------------

def test_unknown_key_names_the_dotted_path_and_suggests_the_close_match():
    msg = error(FilterConfig, {"near_dup_treshold": 0.5}, "filter")
    assert msg.startswith("filter.near_dup_treshold: unknown key")
    assert "did you mean 'near_dup_threshold'" in msg


def test_unknown_key_in_a_nested_section_names_the_full_path():
    msg = error(Outer, {"filter": {"shingle_word": 2}}, "params")
    assert msg.startswith("params.filter.shingle_word: unknown key")
    assert "'shingle_words'" in msg
    msg = error(Outer, {"inner": {"sise": 2}})
    assert msg.startswith("inner.sise: unknown key") and "'size'" in msg


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    msg = error(SplitConfig, {"zzzzzz": 1}, "split")
    assert msg.startswith("split.zzzzzz: unknown key")
    assert "known keys: salt, test_fraction, val_fraction" in msg


# ---- types -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "cls, key, value",
    [
        (FilterConfig, "shingle_words", "3"),  # str for int
        (FilterConfig, "shingle_words", True),  # bool for int
        (FilterConfig, "shingle_words", 3.5),  # float for int
        (FilterConfig, "shingle_words", float("nan")),  # float for int
        (SourceConfig, "fields", ["prompt", "response"]),  # list for dict
        (SourceConfig, "fields", {"prompt": 1, "response": "r"}),  # int for a dict's str value
        (FilterConfig, "near_dup_threshold", "0.5"),  # str for float
        (FilterConfig, "near_dup_threshold", False),  # bool for float
        (FilterConfig, "label_noise", 1),  # int for bool
        (FilterConfig, "label_noise", "yes"),  # str for bool
        (SplitConfig, "salt", 7),  # int for str
        (ValidateConfig, "prompt_chars", 10),  # int for list
        (ValidateConfig, "prompt_chars", [10, "20"]),  # str inside a list of int
    ],
)
def test_wrong_type_is_an_error_naming_the_path(cls, key, value):
    msg = error(cls, {key: value}, "step")
    assert msg.startswith(f"step.{key}")
    assert ": expected " in msg


def test_list_item_error_names_the_index():
    msg = error(ValidateConfig, {"prompt_chars": [10, "20"]}, "validate")
    assert msg.startswith("validate.prompt_chars[1]:")


def test_dict_value_error_names_the_key():
    msg = error(SourceConfig, {"fields": {"prompt": "q", "response": 3}}, "source")
    assert msg.startswith("source.fields.response:")


def test_ints_are_accepted_for_floats_and_become_floats():
    cfg = from_dict(FilterConfig, {"near_dup_threshold": 1, "min_weight": 1})
    assert cfg.near_dup_threshold == 1.0 and type(cfg.near_dup_threshold) is float
    assert type(cfg.min_weight) is float
    gen = from_dict(GenerateConfig, {"noise": 0, "noise_kinds": {"garbage": 2}})
    assert type(gen.noise) is float and type(gen.noise_kinds["garbage"]) is float


def test_integral_floats_are_accepted_for_ints_and_become_ints():
    # KFP hands dict parameters over as protobuf Structs, where every number is a float
    cfg = from_dict(FilterConfig, {"shingle_words": 3.0, "folds": 4.0})
    assert cfg.shingle_words == 3 and type(cfg.shingle_words) is int
    assert type(cfg.folds) is int
    assert error(FilterConfig, {"shingle_words": float("inf")}, "f").startswith("f.shingle_words:")


def test_optional_accepts_none_and_the_type_only():
    assert from_dict(Inner, {"limit": None}).limit is None
    assert from_dict(Inner, {"limit": 3}).limit == 3
    assert error(Inner, {"limit": "3"}, "inner").startswith("inner.limit:")


def test_missing_keys_take_defaults():
    assert from_dict(FilterConfig, {}) == FilterConfig()
    assert from_dict(Outer, {}) == Outer()


def test_a_section_that_is_not_a_mapping_is_an_error():
    assert error(Outer, {"inner": [1, 2]}, "p").startswith("p.inner: expected a mapping of Inner fields, got list")
    assert error(Outer, {"filter": "fast"}).startswith("filter: expected a mapping of FilterConfig fields")
    assert error(FilterConfig, ["not", "a", "dict"]).startswith("FilterConfig: expected a mapping")


# ---- nested dataclasses ------------------------------------------------------------------------

def test_nested_dataclass_is_built_from_a_nested_mapping():
    cfg = from_dict(Outer, {"name": "n", "inner": {"size": 9, "ratio": 2, "tags": ["a", "b"]},
                            "filter": {"folds": 3}})
    assert isinstance(cfg.inner, Inner) and isinstance(cfg.filter, FilterConfig)
    assert cfg.inner == Inner(size=9, ratio=2.0, tags=["a", "b"])
    assert cfg.filter.folds == 3 and cfg.filter.num_perm == FilterConfig().num_perm


def test_wrong_type_deep_inside_names_the_full_path():
    msg = error(Outer, {"inner": {"tags": ["a", 5]}}, "root")
    assert msg.startswith("root.inner.tags[1]:")
    msg = error(Outer, {"filter": {"seed": "0"}}, "root")
    assert msg.startswith("root.filter.seed:")


# ---- check() -----------------------------------------------------------------------------------

def test_check_errors_are_prefixed_with_the_path():
    assert error(FilterConfig, {"folds": 1}, "filter") == "filter.folds: must be at least 2"
    assert error(FilterConfig, {"folds": 1}) == "folds: must be at least 2"
    assert error(Outer, {"filter": {"folds": 1}}, "params") == "params.filter.folds: must be at least 2"
    assert error(Outer, {"inner": {"size": 0}}) == "inner.size: must be at least 1"


@pytest.mark.parametrize(
    "cls, data, field_name",
    [
        (SourceConfig, {"format": "xml"}, "format"),
        (SourceConfig, {"fields": {"prompt": "q"}}, "fields"),
        (SourceConfig, {"fields": {"prompt": "q", "response": "a", "label": "l"}}, "fields"),
        (SourceConfig, {"max_record_bytes": 0}, "max_record_bytes"),
        (GenerateConfig, {"noise": 0.95}, "noise"),
        (GenerateConfig, {"noise_kinds": {"typo": 1.0}}, "noise_kinds"),
        (GenerateConfig, {"noise_kinds": {"garbage": 0}}, "noise_kinds"),
        (GenerateConfig, {"max_ops": 7}, "max_ops"),
        (GenerateConfig, {"max_number": 2}, "max_number"),
        (ValidateConfig, {"prompt_chars": [5, 1]}, "prompt_chars"),
        (SplitConfig, {"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction"),
    ],
)
def test_check_rejects_bad_values(cls, data, field_name):
    assert error(cls, data, "s").startswith(f"s.{field_name}")


# ---- deep_merge --------------------------------------------------------------------------------

def test_deep_merge_merges_nested_mappings_without_modifying_inputs():
    base = {"a": 1, "filter": {"folds": 5, "seed": 0}, "keep": {"x": 1}}
    over = {"filter": {"seed": 3}, "a": {"now": "a dict"}, "new": [1]}
    merged = deep_merge(base, over)
    assert merged == {"a": {"now": "a dict"}, "filter": {"folds": 5, "seed": 3}, "keep": {"x": 1}, "new": [1]}
    assert base == {"a": 1, "filter": {"folds": 5, "seed": 0}, "keep": {"x": 1}}
    assert over == {"filter": {"seed": 3}, "a": {"now": "a dict"}, "new": [1]}
    assert deep_merge({"s": {"k": 1}}, {"s": 2}) == {"s": 2}


# ---- properties --------------------------------------------------------------------------------

def _subset(options: dict) -> st.SearchStrategy[dict]:
    """Random dicts holding any subset of the given keys, each with a value from its strategy."""
    return st.fixed_dictionaries({}, optional=options)


unit = st.floats(0, 1, allow_nan=False)
words = st.text(min_size=1, max_size=20)

VALID = {
    FilterConfig: _subset({
        "near_dup_threshold": st.floats(0.01, 1) | st.just(1),
        "shingle_words": st.integers(1, 10),
        "num_perm": st.integers(16, 512),
        "min_alpha_word_fraction": unit,
        "max_symbol_fraction": unit,
        "max_char_repeat": st.integers(-5, 100),
        "label_noise": st.booleans(),
        "folds": st.integers(2, 20),
        "min_weight": st.floats(0.001, 1),
        "seed": st.integers(-(2**63), 2**63),
    }),
    SplitConfig: _subset({
        "val_fraction": st.floats(0, 0.49),
        "test_fraction": st.floats(0, 0.49) | st.integers(0, 0),
        "salt": st.text(max_size=30),
    }),
    GenerateConfig: _subset({
        "rows": st.integers(1, 10**6),
        "noise": st.floats(0, 0.9) | st.sampled_from([0, 0.9]),
        "seed": st.integers(0, 2**32),
        "max_ops": st.integers(1, 6),
        "max_number": st.integers(3, 10_000),
        "noise_kinds": st.dictionaries(st.sampled_from(NOISE_KINDS), st.floats(0.01, 10) | st.integers(1, 5),
                                       min_size=1),
    }),
    SourceConfig: _subset({
        "format": st.sampled_from(["auto", "jsonl", "parquet", "csv", "text"]),
        "fields": st.fixed_dictionaries({"prompt": words, "response": words},
                                        optional={"id": words, "answer": words}),
        "answer_marker": st.text(max_size=5),
        "strict_columns": st.booleans(),
        "max_record_bytes": st.integers(1, 10**9),
        "text_chunk_chars": st.integers(1, 10**5),
    }),
    ValidateConfig: _subset({
        "prompt_chars": st.tuples(st.integers(0, 100), st.integers(0, 100)).map(sorted),
        "mean_prompt_chars": st.tuples(st.floats(0, 1e4), st.floats(0, 1e4)).map(sorted),
        "max_quarantine_fraction": unit,
        "min_rows": st.integers(1, 10**6),
        "data_docs": st.booleans(),
    }),
}


def _as_float_where_declared(cls, data: dict) -> dict:
    """The values from_dict is expected to hold: ints given for floats become floats."""
    out = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if hints[key] == "float":
            value = float(value)
        elif hints[key] == "dict[str, float]":
            value = {k: float(v) for k, v in value.items()}
        elif hints[key] == "list[float]":
            value = [float(v) for v in value]
        out[key] = value
    return out


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_valid_dicts_round_trip_through_to_dict(cls, data):
    given_dict = data.draw(VALID[cls])
    cfg = from_dict(cls, given_dict)
    plain = to_dict(cfg)
    expected = {**to_dict(cls()), **_as_float_where_declared(cls, given_dict)}
    assert plain == expected
    for key, value in _as_float_where_declared(cls, given_dict).items():
        assert type(plain[key]) is type(value)
    assert from_dict(cls, plain) == cfg


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_unknown_key_always_raises(cls, data):
    known = {f.name for f in dataclasses.fields(cls)}
    key = data.draw(st.text(max_size=30).filter(lambda k: k not in known), label="key")
    value = data.draw(st.none() | st.integers() | st.text() | st.booleans() | st.lists(st.integers()), label="value")
    valid = data.draw(VALID[cls], label="valid")
    with pytest.raises(ConfigError) as info:
        from_dict(cls, {**valid, key: value}, "sec")
    assert f"sec.{key}: unknown key" in str(info.value)
