"""Tags changed by hand with plain git (components/registry/doctor.py): each is named by the stage
commands in one line with the repair command, `distillery registry doctor --fix` puts back what
the registry's records allow, and promotion works again. Real git throughout."""

from __future__ import annotations

import json

import gto.api
import pytest
import yaml
from registry_helpers import METRICS, git, make_model

from components.registry import GateError, Registry, RegistryError
from components.registry.doctor import diagnose
from components.registry.records import parse_message
from pipelines.cli import main


def better(delta: float) -> dict:
    return dict(METRICS, accuracy=round(METRICS["accuracy"] + delta, 6))


@pytest.fixture
def history(registry, model_factory) -> Registry:
    """v0.0.1 then v0.0.2 through staging into production; v0.0.3 registered, in no stage.
    Tags: lm#staging#1, lm#production#2, lm#staging#3, lm#staging!#4, lm#production#5, lm#production!#6."""
    for i in range(3):
        registry.register(model_factory(metrics=better(0.05 * i)), "lm")
    for version in ("v0.0.1", "v0.0.2"):
        registry.promote("lm", version, to="staging")
        registry.promote("lm", version, to="production")
    assert registry.stages("lm") == {"staging": "v0.0.2", "production": "v0.0.2"}
    return registry


def tags(reg: Registry) -> str:
    return git(reg.root, "for-each-ref", "refs/tags", "--format=%(refname) %(objectname)")


def prune(reg: Registry) -> None:
    """What `git gc` does to unreferenced objects two weeks on: they are gone."""
    git(reg.root, "reflog", "expire", "--expire-unreachable=now", "--all")
    git(reg.root, "gc", "-q", "--prune=now")


def cli(reg: Registry, capsys, *argv: str) -> tuple[int, str, str]:
    params = reg.root.parent / "params.yaml"
    params.write_text(yaml.safe_dump({"registry": {"root": str(reg.root), "name": "lm"}}))
    head = [] if argv[0] in ("promote", "rollback") else ["registry"]
    code = main([*head, *argv, "--params", str(params), "--actor", "CI <ci@example.com>"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_deleted_version_tag_is_named_and_put_back(history, capsys):
    before = tags(history)
    git(history.root, "tag", "-d", "lm@v0.0.2")
    assert gto.api.show(str(history.root))["lm"]["stage"]["production"] != "v0.0.2"  # GTO shows a commit hash
    code, out, err = cli(history, capsys, "current")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert "tag lm@v0.0.2 is missing (deleted by hand); v0.0.2 was registered by commit" in err
    assert f"`distillery registry doctor --registry {history.root} --name lm`" in err
    with pytest.raises(RegistryError, match=r"lm@v0\.0\.2 is missing"):
        history.promote("lm", "v0.0.3", to="staging")
    code, out, _ = cli(history, capsys, "doctor")
    assert code == 1 and "problem: lm@v0.0.2 is missing" in out and "--fix puts back the original tag" in out
    assert tags(history) != before  # doctor alone changes nothing
    code, out, _ = cli(history, capsys, "doctor", "--fix")
    assert code == 0 and "repaired lm@v0.0.2: puts back the original tag" in out
    assert tags(history) == before  # the very tag object the registry made
    assert cli(history, capsys, "current")[1].strip() == "v0.0.2"
    assert history.promote("lm", "v0.0.3", to="staging").status == "promoted"
    assert cli(history, capsys, "doctor")[0] == 0


def test_a_stage_tag_moved_to_a_foreign_commit_is_named_and_put_back(history, capsys):
    before = tags(history)
    create = git(history.root, "rev-list", "--max-parents=0", "HEAD").strip()  # the commit that made .gto
    git(history.root, "tag", "-f", "lm#production#5", create)
    with pytest.raises(RegistryError, match=rf"tag lm#production#5 points at commit {create[:7]}, which no version "
                                            r"names; the registry's tags were changed by hand"):
        history.current("lm", "production")
    problems = diagnose(history.root, "lm")
    assert [p.tag for p in problems] == ["lm#production#5"] and problems[0].fix.startswith("puts back")
    code, out, _ = cli(history, capsys, "doctor", "--fix")
    assert code == 0 and "repaired lm#production#5: puts back the original tag" in out and ", at v0.0.2" in out
    assert tags(history) == before
    # the gate compares with production again (a moved or deleted stage tag had emptied it for GTO)
    worse = make_model(history.root.parent / "worse", 99, better(-0.2))
    history.register(worse, "lm")
    with pytest.raises(GateError, match=r"FAIL accuracy: candidate 0\.21, production 0\.46"):
        history.promote("lm", "v0.0.4", to="staging")
    assert history.promote("lm", "v0.0.3", to="staging").status == "promoted"


@pytest.mark.parametrize("deleted, stages_seen", [
    ("lm#production#5", {"staging": "v0.0.2", "production": None}),  # production looks empty to GTO
    ("lm#production!#6", {"staging": "v0.0.2", "production": "v0.0.2"}),  # the newest tag: no hole in the counters
])
def test_a_deleted_stage_tag_is_named_and_put_back(history, capsys, deleted, stages_seen):
    before = tags(history)
    git(history.root, "tag", "-d", deleted)
    assert history.stages("lm") == stages_seen  # what GTO reads, unchecked
    code, _, err = cli(history, capsys, "promote", "v0.0.3", "--to", "staging")
    assert code == 1 and f"tag {deleted} is missing (deleted by hand)" in err
    code, _, err = cli(history, capsys, "show")
    assert code == 1 and f"tag {deleted} is missing" in err
    code, out, _ = cli(history, capsys, "doctor", "--fix")
    assert code == 0 and f"repaired {deleted}: puts back the original tag" in out
    assert tags(history) == before
    assert json.loads(cli(history, capsys, "show")[1])["stages"] == {"staging": "v0.0.2", "production": "v0.0.2"}
    code, out, _ = cli(history, capsys, "promote", "v0.0.3", "--to", "staging")
    assert code == 0 and "staging: promoted v0.0.3 (was v0.0.2), tags lm#staging#7, lm#staging!#8" in out


def test_a_pruned_version_tag_is_made_again_from_its_commit(history, capsys):
    original = parse_message(git(history.root, "tag", "-l", "--format=%(contents)", "lm@v0.0.1"))
    git(history.root, "tag", "-d", "lm@v0.0.1")
    prune(history)
    code, out, _ = cli(history, capsys, "doctor", "--fix")
    assert code == 0 and "repaired lm@v0.0.1: makes it again at" in out and "from that commit's record" in out
    assert parse_message(git(history.root, "tag", "-l", "--format=%(contents)", "lm@v0.0.1")) == original
    commit = git(history.root, "rev-parse", "lm@v0.0.1^{commit}").strip()
    assert git(history.root, "log", "-1", "--format=%ct", commit) == git(
        history.root, "tag", "-l", "--format=%(taggerdate:unix)", "lm@v0.0.1")  # dated as its commit
    assert git(history.root, "tag", "-l", "--format=%(taggername) %(taggeremail)", "lm@v0.0.1").strip() \
        == "Ada Lovelace <ada@example.com>"
    assert history.versions("lm") == ["v0.0.1", "v0.0.2", "v0.0.3"]
    assert [v["version"] for v in gto.api.show(str(history.root), "lm")] == ["v0.0.3", "v0.0.2", "v0.0.1"]
    assert history.rollback("lm").version == "v0.0.1"


def test_a_hand_made_stage_tag_is_removed_and_a_lost_one_is_a_warning(history, capsys):
    create = git(history.root, "rev-list", "--max-parents=0", "HEAD").strip()
    git(history.root, "tag", "lm#production#9", create)  # a new tag, made by hand: nothing to put back
    code, out, _ = cli(history, capsys, "doctor", "--fix")
    assert code == 0 and f"repaired lm#production#9: removes it; `git tag lm#production#9 {create[:12]}` would " \
                         "make it again" in out
    # a registry-made tag replaced by hand, its original pruned: nothing the records can put back
    git(history.root, "tag", "-f", "-a", "-m", "by hand", "lm#staging#3", create)
    prune(history)
    code, out, _ = cli(history, capsys, "doctor", "--fix")
    assert code == 0 and "repaired lm#staging#3: removes it" in out
    assert "warning: lm#<stage>#3 is missing, and no copy of it is left to put back" in out
    assert cli(history, capsys, "current")[1].strip() == "v0.0.2"  # a hole does not block
    assert history.promote("lm", "v0.0.3", to="staging").status == "promoted"


def test_tags_a_failed_change_deleted_itself_are_not_taken_for_hand_edits(history):
    """A reference-transaction hook refuses unassignment tags: the promotion's assignment tag is
    deleted again and the refused tag's object was written but never referenced; both are noted
    in <git-dir>/distillery-undone-tags."""
    hook = history.root / ".git" / "hooks" / "reference-transaction"
    hook.write_text("#!/bin/sh\nif [ \"$1\" = prepared ] && grep -q 'refs/tags/.*!'; then exit 1; fi; exit 0\n")
    hook.chmod(0o755)
    with pytest.raises(RegistryError, match="git tag"):
        history.promote("lm", "v0.0.3", to="staging")
    hook.unlink()
    undone = (history.root / ".git" / "distillery-undone-tags").read_text().split()
    assert len(undone) == 2
    assert diagnose(history.root, "lm") == []
    assert history.promote("lm", "v0.0.3", to="staging").tags == ["lm#staging#7", "lm#staging!#8"]
