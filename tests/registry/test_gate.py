"""The promotion gate: properties of the pure predicate, then on a real registry that promote
succeeds exactly when the gate holds and leaves the tags untouched when it does not."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from registry_helpers import METRICS, git, make_model

from components.config import ConfigError, from_dict, to_dict
from components.registry import GateError, Registry
from components.registry.config import GateConfig, RegistryConfig
from components.registry.gate import evaluate_gate
from components.registry.registry import parse_message, tag_message

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
odd = st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(True), st.just("0.5"), st.none())
GATE = GateConfig(metric="accuracy", min_gain=0.0, max_regression={"format_rate": 0.01, "p95_ms": 5.0})
PASSED = {"passed": True}


def metrics(acc, fr, p95):
    return {"accuracy": acc, "format_rate": fr, "p95_ms": p95}


@settings(max_examples=400, deadline=None)
@given(p=st.tuples(unit, unit, finite), gain=st.floats(min_value=-1.0, max_value=0.0))
def test_a_candidate_no_better_than_production_never_passes(p, gain):
    prod = metrics(*p)
    cand = dict(prod, accuracy=prod["accuracy"] + gain)
    assert not evaluate_gate(GATE, cand, prod, PASSED).passed
    assert not evaluate_gate(GATE, prod, prod, PASSED).passed  # equal is not better


@settings(max_examples=400, deadline=None)
@given(p=st.tuples(unit, unit, finite), c=st.tuples(unit, unit, finite), more=st.floats(min_value=0, max_value=1))
def test_passing_is_monotone_in_the_gate_metric(p, c, more):
    prod, cand = metrics(*p), metrics(*c)
    if evaluate_gate(GATE, cand, prod, PASSED).passed:
        assert evaluate_gate(GATE, dict(cand, accuracy=cand["accuracy"] + more), prod, PASSED).passed
        assert not evaluate_gate(GATE, cand, prod, {"passed": False}).passed
        assert not evaluate_gate(GATE, cand, prod, None).passed


@settings(max_examples=400, deadline=None)
@given(p=st.tuples(unit, unit, finite), c=st.tuples(unit, unit, finite))
def test_regressions_beyond_the_allowance_fail(p, c):
    prod, cand = metrics(*p), metrics(*c)
    report = evaluate_gate(GATE, cand, prod, PASSED)
    by_metric = {r.metric: r.ok for r in report.rules}
    assert by_metric["format_rate"] == (prod["format_rate"] - cand["format_rate"] <= 0.01)
    assert by_metric["p95_ms"] == (cand["p95_ms"] - prod["p95_ms"] <= 5.0)  # lower is better
    assert by_metric["accuracy"] == (cand["accuracy"] - prod["accuracy"] > 0.0)
    assert report.passed == all(by_metric.values())


@settings(max_examples=300, deadline=None)
@given(bad=odd, key=st.sampled_from(["accuracy", "format_rate", "p95_ms"]), side=st.booleans())
def test_missing_or_odd_values_fail_closed(bad, key, side):
    good = metrics(0.5, 0.99, 10.0)
    cand, prod = (dict(good, **{key: bad}), dict(good, accuracy=0.1)) if side else (dict(good), dict(good, **{key: bad}))
    assert not evaluate_gate(GATE, cand, prod, PASSED).passed
    del cand[key]
    assert not evaluate_gate(GATE, cand, prod, PASSED).passed


@settings(max_examples=200, deadline=None)
@given(c=st.tuples(unit, unit, finite), floor=unit, ceiling=finite)
def test_absolute_bounds_hold_without_production(c, floor, ceiling):
    gate = GateConfig(minimums={"accuracy": floor}, maximums={"p95_ms": ceiling})
    cand = metrics(*c)
    assert evaluate_gate(gate, cand, None, PASSED).passed == (cand["accuracy"] >= floor and cand["p95_ms"] <= ceiling)


def test_promote_succeeds_iff_the_gate_holds_on_a_real_registry(tmp_path):
    """Property on real git + GTO: for random candidate metrics, promote to staging succeeds
    exactly when the gate predicate holds, and a refusal leaves the tag list unchanged."""
    gate = GateConfig(metric="accuracy", min_gain=0.02, max_regression={"format_rate": 0.01})
    reg = Registry.init(tmp_path / "r", RegistryConfig(root=str(tmp_path / "r"), name="lm", gate=gate), actor="A <a@b>")
    prod = dict(METRICS, accuracy=0.5, format_rate=0.9)
    reg.register(make_model(tmp_path / "prod", 0, prod), "lm")
    reg.promote("lm", "v0.0.1", to="staging")
    reg.promote("lm", "v0.0.1", to="production")
    seeds = itertools.count(1)
    near = st.sampled_from([-0.05, -0.01, 0.0, 0.0199, 0.02, 0.0201, 0.05])

    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(d_acc=st.one_of(near, st.floats(-0.2, 0.2)), d_fr=st.one_of(st.sampled_from([0.0, -0.01, -0.02, 0.01]),
                                                                         st.floats(-0.05, 0.05)), ok=st.booleans())
    def check(d_acc, d_fr, ok):
        cand = dict(METRICS, accuracy=0.5 + d_acc, format_rate=0.9 + d_fr)
        n = next(seeds)
        version = reg.register(make_model(tmp_path / f"c{n}", n, cand, {"passed": ok}), "lm").version
        holds = ok and (cand["accuracy"] - prod["accuracy"] > 0.02) and (prod["format_rate"] - cand["format_rate"] <= 0.01)
        tags = git(reg.root, "tag")
        if holds:
            assert reg.promote("lm", version, to="staging").status == "promoted"
            assert reg.current("lm", "staging") == version
        else:
            with pytest.raises(GateError):
                reg.promote("lm", version, to="staging")
            assert git(reg.root, "tag") == tags
        assert reg.current("lm", "production") == "v0.0.1"

    check()


def test_config_is_strict_and_names_the_key():
    with pytest.raises(ConfigError, match=r"gate\.min_gian: unknown key; did you mean 'min_gain'\?"):
        from_dict(RegistryConfig, {"gate": {"min_gian": 0.1}})
    with pytest.raises(ConfigError, match=r"gate\.min_gain: must be >= 0"):
        from_dict(RegistryConfig, {"gate": {"min_gain": -0.1}})
    with pytest.raises(ConfigError, match=r"gate\.max_regression\.format_rate: expected a number"):
        from_dict(RegistryConfig, {"gate": {"max_regression": {"format_rate": "a lot"}}})
    with pytest.raises(ConfigError, match=r"name: 'my model'"):
        from_dict(RegistryConfig, {"name": "my model"})
    cfg = from_dict(RegistryConfig, {"root": "r", "gate": {"maximums": {"p95_ms": 250}}})
    assert from_dict(RegistryConfig, to_dict(cfg)) == cfg and cfg.gate.maximums == {"p95_ms": 250.0}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(record=st.dictionaries(st.text(max_size=8), json_values, max_size=5), action=st.text(min_size=1, max_size=8),
       summary=st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s and not s.startswith("{")))
def test_tag_messages_round_trip(record, action, summary):
    record = dict(record, action=action)
    assume(all(not (isinstance(v, float) and math.isnan(v)) for v in record.values()))
    assert parse_message(tag_message(summary, record)) == record
    assert parse_message(summary) is None
