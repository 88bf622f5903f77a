"""The registry end to end on real git and real GTO: register, promote, idempotence, rollback,
what the tags say, what GTO reads from them, and failures that leave nothing behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import gto.api
import pytest
from registry_helpers import METRICS, git, snapshot

from components.registry import GateError, Registry, RegistryError, RollbackError
from components.registry.config import GateConfig, RegistryConfig
from components.registry.registry import parse_message


def better(delta: float) -> dict:
    return dict(METRICS, accuracy=round(METRICS["accuracy"] + delta, 6))


def to_production(reg: Registry, version: str) -> None:
    reg.promote("lm", version, to="staging")
    reg.promote("lm", version, to="production")


def test_register_promote_and_gto_reads_the_tags(registry, model_factory):
    r1 = registry.register(model_factory(), "lm")
    assert (r1.version, r1.changed, r1.tag) == ("v0.0.1", True, "lm@v0.0.1")
    assert sorted(p.name for p in r1.path.iterdir()) == ["check.json", "metrics.json", "model.json",
                                                         "model.safetensors", "registration.json", "tokenizer"]
    to_production(registry, "v0.0.1")
    r2 = registry.register(model_factory(metrics=better(0.05)), "lm")
    assert r2.version == "v0.0.2"
    change = registry.promote("lm", "v0.0.2", to="staging")
    assert (change.status, change.previous, change.tags) == ("promoted", "v0.0.1", ["lm#staging#3", "lm#staging!#4"])
    # GTO itself, from the tags alone
    shown = gto.api.show(str(registry.root))
    assert shown["lm"]["stage"] == {"staging": "v0.0.2", "production": "v0.0.1"}
    assert gto.api.find_versions_in_stage(str(registry.root), "lm", "staging")[0].version == "v0.0.2"
    assert [v["version"] for v in gto.api.show(str(registry.root), "lm")] == ["v0.0.2", "v0.0.1"]
    assert registry.stages("lm") == {"staging": "v0.0.2", "production": "v0.0.1"}
    # serving follows the stage; what it exports is what was registered
    assert registry.serving_path("lm") == registry.root / "models" / "lm" / "v0.0.1"
    registry.verify("lm", "v0.0.1")
    assert git(registry.root, "status", "--porcelain") == ""
    index = (registry.root / "artifacts.yaml").read_text()
    assert "lm:" in index and "path: models/lm" in index and "type: model" in index


def test_tag_messages_carry_who_when_and_metrics(registry, model_factory):
    registry.register(model_factory(), "lm")
    registry.promote("lm", "v0.0.1", to="staging", actor="Grace Hopper <grace@example.com>", note="weekly")
    for tag in ("lm@v0.0.1", "lm#staging#1"):
        assert git(registry.root, "cat-file", "-t", tag).strip() == "tag"  # annotated, not lightweight
    message = git(registry.root, "tag", "-l", "--format=%(contents)", "lm#staging#1")
    record = parse_message(message)
    assert record["action"] == "promote" and record["stage"] == "staging" and record["version"] == "v0.0.1"
    assert record["by"] == "Grace Hopper <grace@example.com>" and record["note"] == "weekly"
    assert record["at"].endswith("Z") and record["at"][:2] == "20"
    assert record["metrics"] == METRICS and record["gate"]["passed"] is True
    assert git(registry.root, "tag", "-l", "--format=%(taggername) %(taggeremail)", "lm#staging#1").strip() \
        == "Grace Hopper <grace@example.com>"
    reg_record = parse_message(git(registry.root, "tag", "-l", "--format=%(contents)", "lm@v0.0.1"))
    assert reg_record["by"] == "Ada Lovelace <ada@example.com>" and reg_record["metrics"] == METRICS
    events = gto.api.history(str(registry.root), "lm")
    assert {e["event"] for e in events} == {"registration", "assignment"}
    assert all(parse_message(e["message"])["metrics"] == METRICS for e in events)


def test_promoting_twice_equals_promoting_once(registry, model_factory):
    registry.register(model_factory(), "lm")
    registry.promote("lm", "v0.0.1", to="staging")
    once = snapshot(registry.root)
    again = registry.promote("lm", "v0.0.1", to="staging")
    assert again.status == "unchanged" and again.tags == []
    registry.promote("lm", "v0.0.1", to="production")
    after_prod = snapshot(registry.root)
    assert registry.promote("lm", "v0.0.1", to="production").status == "unchanged"
    assert snapshot(registry.root) == after_prod and once["tags"] != after_prod["tags"]


def test_registering_the_same_files_again_changes_nothing(registry, model_factory):
    first = registry.register(model_factory(seed=7), "lm")
    before = snapshot(registry.root)
    again = registry.register(model_factory(seed=7, metrics=better(0.2)), "lm")
    assert (again.version, again.changed, again.digest) == (first.version, False, first.digest)
    assert snapshot(registry.root) == before


def test_rollback_restores_the_previous_version(registry, model_factory):
    for i in range(3):
        registry.register(model_factory(metrics=better(0.01 * i)), "lm")
        to_production(registry, f"v0.0.{i + 1}")
    assert registry.current("lm", "production") == "v0.0.3"
    change = registry.rollback("lm", actor="Ops <ops@example.com>")
    assert (change.status, change.previous, change.version) == ("rolled_back", "v0.0.3", "v0.0.2")
    assert registry.current("lm", "production") == "v0.0.2"
    assert gto.api.show(str(registry.root))["lm"]["stage"]["production"] == "v0.0.2"
    record = parse_message(git(registry.root, "tag", "-l", "--format=%(contents)", change.tags[0]))
    assert record["reason"] == "rollback from v0.0.3 to v0.0.2" and record["by"] == "Ops <ops@example.com>"
    assert registry.serving_path("lm") == registry.root / "models" / "lm" / "v0.0.2"
    # a second rollback goes one further back, not forward again
    assert registry.rollback("lm").version == "v0.0.1"
    assert registry.stages("lm") == {"staging": "v0.0.3", "production": "v0.0.1"}
    before = snapshot(registry.root)
    with pytest.raises(RollbackError, match="no previous version"):
        registry.rollback("lm")
    assert snapshot(registry.root) == before
    # and the way forward is open again through the gate
    to_production(registry, "v0.0.2")
    assert registry.stage_stack("lm") == ["v0.0.1", "v0.0.2"]


def test_rollback_with_nothing_in_the_stage(registry, model_factory):
    registry.register(model_factory(), "lm")
    with pytest.raises(RollbackError, match="holds no version"):
        registry.rollback("lm")


def test_worse_candidate_is_refused_with_every_metric_listed(registry, model_factory):
    registry.register(model_factory(), "lm")
    to_production(registry, "v0.0.1")
    registry.register(model_factory(metrics=dict(METRICS, accuracy=0.40, format_rate=0.95)), "lm")
    before = snapshot(registry.root)
    with pytest.raises(GateError) as err:
        registry.promote("lm", "v0.0.2", to="staging")
    text = str(err.value)
    assert "FAIL accuracy: candidate 0.4, production 0.41" in text
    assert "FAIL format_rate: candidate 0.95, production 0.99" in text
    assert [r.metric for r in err.value.report.failures()] == ["accuracy", "format_rate"]
    assert snapshot(registry.root) == before
    assert registry.current("lm", "staging") == "v0.0.1"


def test_failed_serve_check_is_never_staged(registry, model_factory):
    registry.register(model_factory(check={"passed": False, "error": "no answer in 30 s"}), "lm")
    before = snapshot(registry.root)
    with pytest.raises(GateError, match="FAIL check.passed"):
        registry.promote("lm", "v0.0.1", to="staging")
    assert snapshot(registry.root) == before


def test_production_takes_only_what_staging_holds(registry, model_factory):
    registry.register(model_factory(), "lm")
    before = snapshot(registry.root)
    with pytest.raises(RegistryError, match="not in staging"):
        registry.promote("lm", "v0.0.1", to="production")
    assert snapshot(registry.root) == before
    with pytest.raises(RegistryError, match="no such registered version"):
        registry.promote("lm", "v0.0.9", to="staging")
    with pytest.raises(RegistryError, match="expected one of"):
        registry.promote("lm", "v0.0.1", to="prod")


def test_absolute_thresholds_apply_to_the_first_model(tmp_path, model_factory):
    cfg = RegistryConfig(root=str(tmp_path / "r"), name="lm", gate=GateConfig(minimums={"accuracy": 0.5},
                                                                              maximums={"p95_ms": 10.0}))
    reg = Registry.init(tmp_path / "r", cfg, actor="A <a@b>")
    reg.register(model_factory(), "lm")
    with pytest.raises(GateError) as err:
        reg.promote("lm", "v0.0.1", to="staging")
    assert {r.metric for r in err.value.report.failures()} == {"accuracy", "p95_ms"}
    assert reg.current("lm", "staging") is None


def test_gate_reads_metrics_from_the_tagged_commit_not_the_work_tree(registry, model_factory):
    registry.register(model_factory(), "lm")
    to_production(registry, "v0.0.1")
    registry.register(model_factory(metrics=dict(METRICS, accuracy=0.1)), "lm")
    folder = registry.root / "models" / "lm" / "v0.0.2"
    (folder / "metrics.json").chmod(stat.S_IWUSR | stat.S_IRUSR)
    (folder / "metrics.json").write_text(json.dumps(dict(METRICS, accuracy=0.99)))
    with pytest.raises(GateError):
        registry.promote("lm", "v0.0.2", to="staging")
    (folder / "model.json").chmod(stat.S_IWUSR | stat.S_IRUSR)
    (folder / "model.json").write_text("{}")
    with pytest.raises(RegistryError, match="model.json"):
        registry.verify("lm", "v0.0.2")


def _hook(root: Path, name: str, script: str) -> Path:
    hook = root / ".git" / "hooks" / name
    hook.write_text("#!/bin/sh\n" + script + "\n")
    hook.chmod(0o755)
    return hook


def test_a_failed_commit_leaves_no_folder_index_entry_or_staged_file(registry, model_factory):
    """A real pre-commit hook refuses the commit after the version folder was renamed into
    place and artifacts.yaml written: both must go again, nothing staged."""
    before = snapshot(registry.root)
    hook = _hook(registry.root, "pre-commit", "echo 'policy: no commits today' >&2; exit 1")
    with pytest.raises(RegistryError, match="no commits today"):
        registry.register(model_factory(), "lm")
    assert snapshot(registry.root) == before
    hook.unlink()
    assert registry.register(model_factory(), "lm").version == "v0.0.1"


def test_a_failed_second_tag_removes_the_first(registry, model_factory):
    """A real reference-transaction hook refuses unassignment tags: the promotion's assignment
    tag, already made, must be deleted again."""
    for i in range(2):
        registry.register(model_factory(metrics=better(0.01 * i)), "lm")
    registry.promote("lm", "v0.0.1", to="staging")
    before = snapshot(registry.root)
    hook = _hook(registry.root, "reference-transaction",
                 "if [ \"$1\" = prepared ] && grep -q 'refs/tags/.*!'; then exit 1; fi; exit 0")
    with pytest.raises(RegistryError, match="git tag"):
        registry.promote("lm", "v0.0.2", to="staging")
    assert snapshot(registry.root) == before
    assert registry.current("lm", "staging") == "v0.0.1"
    hook.unlink()
    assert registry.promote("lm", "v0.0.2", to="staging").tags == ["lm#staging#2", "lm#staging!#3"]


def test_refuses_leftovers_in_registry_paths(registry, model_factory):
    stray = registry.root / "models" / "lm" / "v0.0.1"
    stray.mkdir(parents=True)
    (stray / "half.json").write_text("{}")
    with pytest.raises(RegistryError, match="uncommitted changes"):
        registry.register(model_factory(), "lm")


def test_open_requires_an_initialised_registry(tmp_path):
    with pytest.raises(RegistryError, match="not a model registry"):
        Registry(tmp_path)
    reg = Registry.init(tmp_path / "r", actor="A <a@b>")
    head = git(reg.root, "rev-parse", "HEAD")
    assert git(Registry.init(tmp_path / "r").root, "rev-parse", "HEAD") == head  # idempotent


def _promote_in_process(root: str, version: str, barrier, queue) -> None:
    try:
        reg = Registry(root, RegistryConfig(root=root, name="lm"), actor=f"p{os.getpid()} <p@x>")
        reg.stages("lm")  # warm up imports so both reach promote together
        barrier.wait(30)
        queue.put(reg.promote("lm", version, to="staging").status)
    except Exception as err:  # reported to the parent
        queue.put(f"error: {type(err).__name__}: {err}")


def test_two_promotes_at_once_do_not_corrupt(registry, model_factory):
    """Two processes released by one barrier promote the same version: the lock serialises
    them, so one promotes and the other finds it done (without the lock both read an empty
    stage and race for the same tag name)."""
    registry.register(model_factory(), "lm")
    ctx = multiprocessing.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_promote_in_process, args=(str(registry.root), "v0.0.1", barrier, queue))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(10)
    assert results == ["promoted", "unchanged"]
    assert [t for t in git(registry.root, "tag").split() if "#" in t] == ["lm#staging#1"]
    assert registry.current("lm", "staging") == "v0.0.1"
