"""Tags changed by hand: find them, say what is wrong, put back what the registry's records allow.

    problems = diagnose(root, "lm")                 # [] when the tags agree with the records
    require_consistent(root, "lm")                  # RegistryError naming the first problem
    done = repair(root, problems)                   # one line per repair (hold the registry lock)

`distillery registry doctor [--fix]` runs these; the commands that read or change stages
(current, path --stage, show, promote, rollback, serve --stage) run require_consistent first,
so a hand-edited registry is named as such instead of printing a commit hash as a version or
failing later with a raw git error.

The registry's own records. Each registration is a commit whose message carries the register
record (artifact, version, digest): HEAD's history says which commit each version is, whatever
the tags say. Each tag the registry makes is annotated and carries its record (action, version,
stage, from). A tag deleted (`git tag -d`) or moved (`git tag -f`) by hand leaves its annotated
tag object in the object store, unreferenced, until git prunes unreachable objects (two weeks
by default; `git gc --prune=now` at once). That object is the tag exactly as the registry made
it (target, date, tagger, message): putting it back with `git update-ref` restores what GTO
reads, the order of stage events included (GTO orders them by tag date). Tags the registry
deletes itself, when a change fails half-way (gitops.Transaction), are listed in
<git-dir>/distillery-undone-tags and are not mistaken for tags deleted by hand.

Checked, for one artifact:
  versions   every registration commit in HEAD's history has its tag <name>@<version>,
             annotated (GTO ignores lightweight tags) and at that commit; every version tag
             names a registration
  stages     each stage tag points at a registration commit, is annotated, and names the version
             its own record names (assign: the version; unassign: the version leaving)
  deleted    a registry-made stage tag object that no tag holds any more
  holes      GTO's counters over the artifact's stage tags run 1..N; a counter with no tag and no
             object left is a hole in the stage history: reported, not blocking (what is left is
             consistent; a rollback replays a shorter history)

Repaired: a deleted or moved tag whose object is still there is put back as it was; a version
tag whose object is gone is made anew at its registration commit, with that commit's record and
date; a tag the registry never made (no record) that names no version is removed (the report
prints the command that would make it again). Not repaired, with what to do instead: a
registry-made stage tag whose object is gone (its date, which orders GTO's stage events, is
lost: delete it and promote again), a version tag whose registration left HEAD's history (a
reset branch), holes.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.registry import gitops
from components.registry.errors import RegistryError
from components.registry.records import parse_message, tag_message

ZERO = "0" * 40


@dataclass(frozen=True)
class Tag:
    """A tag as git holds it: a ref under refs/tags, or an annotated tag object no ref holds."""

    name: str
    object: str
    commit: str
    """What it points at ("" when that is not a commit)."""
    annotated: bool
    date: str
    """The tagger date as git writes it ("1700000000 +0000"); "" for a lightweight tag."""
    record: dict[str, Any] | None
    """The registry's record in its message; None for a tag the registry did not make."""


@dataclass(frozen=True)
class Registration:
    """A registration commit of HEAD's history and its record."""

    version: str
    commit: str
    date: str
    record: dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """One inconsistency: the tag at fault, what is wrong, and the repair (or why there is none)."""

    tag: str
    what: str
    fix: str | None
    """What `repair` does about it; None when it cannot (then `by_hand` says what to do)."""
    by_hand: str = ""
    blocking: bool = True
    """Stage commands refuse to run while a blocking problem is there."""
    action: tuple = ()
    """For repair: ("restore", tag, object, old), ("remake", tag, commit, message, date, actor, old),
    ("delete", tag, old); old is the object the ref holds now (ZERO: none)."""

    def line(self) -> str:
        fix = f"--fix {self.fix}" if self.fix else f"not repaired by --fix: {self.by_hand}"
        return f"{self.tag} {self.what} ({fix})"


def _run(root: str | os.PathLike, *args: str, data: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", "-C", str(root), *args], input=data, capture_output=True)
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip()
        raise RegistryError(f"git {' '.join(args[:2])} in {root} failed: {message}")
    return proc.stdout


def _parse(tag: str, name: str) -> dict[str, Any]:
    """GTO's reading of a tag name, when the tag is `name`'s ({} otherwise)."""
    from gto.tag import parse_name

    parsed = parse_name(tag, raise_on_fail=False)
    return parsed if parsed and parsed.get("name") == name else {}


def tag_refs(root: str | os.PathLike) -> dict[str, Tag]:
    """Every tag ref, with its object, commit, date and record (one for-each-ref)."""
    fmt = "%(refname:strip=2)%00%(objecttype)%00%(objectname)%00%(*objectname)%00%(*objecttype)%00" \
          "%(taggerdate:raw)%00%(contents)%1e"
    out = _run(root, "for-each-ref", "refs/tags", f"--format={fmt}").decode("utf-8", "replace")
    tags = {}
    for entry in out.split("\x1e"):
        fields = entry.lstrip("\n").split("\x00")
        if len(fields) != 7:
            continue
        name, kind, obj, peeled, peeled_kind, date, message = fields
        annotated = kind == "tag"
        commit = (peeled if peeled_kind == "commit" else "") if annotated else (obj if kind == "commit" else "")
        tags[name] = Tag(name, obj, commit, annotated, date if annotated else "",
                         parse_message(message) if annotated else None)
    return tags


def unreferenced_tags(root: str | os.PathLike) -> list[Tag]:
    """The annotated tag objects no ref holds (gitops.unreferenced_tag_objects), read as tags."""
    tags = []
    for obj, text in gitops.unreferenced_tag_objects(root):
        head, _, message = text.lstrip("\n").partition("\n\n")
        fields = dict(line.split(" ", 1) for line in head.splitlines() if " " in line)
        date = " ".join(fields.get("tagger", "").rsplit(" ", 2)[-2:])
        commit = fields.get("object", "") if fields.get("type") == "commit" else ""
        tags.append(Tag(fields.get("tag", ""), obj, commit, True, date, parse_message(message)))
    return tags


def registrations(root: str | os.PathLike, name: str) -> dict[str, Registration]:
    """{version: its registration} from the commit records of HEAD's history (newest wins)."""
    out = _run(root, "log", "--format=%H%x00%ct%x00%B%x1e", "HEAD").decode("utf-8", "replace")
    found: dict[str, Registration] = {}
    for entry in out.split("\x1e"):
        fields = entry.lstrip("\n").split("\x00")
        if len(fields) != 3:
            continue
        record = parse_message(fields[2])
        if record and record.get("action") == "register" and record.get("artifact") == name \
                and isinstance(record.get("version"), str) and record["version"] not in found:
            found[record["version"]] = Registration(record["version"], fields[0], f"{fields[1]} +0000", record)
    return found


def undone(root: str | os.PathLike) -> set[str]:
    path = gitops.git_dir(root) / gitops.UNDONE_NAME
    return set(path.read_text().split()) if path.is_file() else set()


def _recorded(tag: Tag, parsed: dict[str, Any]) -> str | None:
    """The version a stage tag's record names: the version assigned, or the one leaving."""
    from gto.constants import Action

    if not tag.record:
        return None
    value = tag.record.get("from" if parsed.get("action") == Action.UNASSIGN else "version")
    return value if isinstance(value, str) else None


def _counter(tag: str) -> int:
    return int(tag.rsplit("#", 1)[1])


def diagnose(root: str | os.PathLike, name: str) -> list[Problem]:
    """Every way `name`'s tags disagree with the registry's records (see the module docstring)."""
    from gto.constants import Action

    root = Path(root)
    every = tag_refs(root)
    refs = {t: tag for t, tag in every.items() if _parse(t, name)}
    skip = undone(root)
    gone = [t for t in unreferenced_tags(root) if t.record and t.object not in skip and _parse(t.name, name)]
    regs = registrations(root, name)
    by_commit = {r.commit: v for v, r in regs.items()}
    problems: list[Problem] = []

    def original(tag: str, ok) -> Tag | None:
        found = [t for t in gone if t.name == tag and ok(t)]
        return max(found, key=lambda t: int(t.date.split()[0] or 0)) if found else None

    # versions: each registration has its annotated tag at its commit
    for version, reg in sorted(regs.items(), key=lambda kv: tuple(int(x) for x in kv[0][1:].split(".")
                                                                     if x.isdigit())):
        tag = f"{name}@{version}"
        ref = refs.get(tag)
        if ref is not None and ref.commit == reg.commit and ref.annotated:
            continue
        old = ref.object if ref else ZERO
        if ref is None:
            what = f"is missing (deleted by hand); {version} was registered by commit {reg.commit[:7]}"
        elif ref.commit != reg.commit:
            what = (f"points at commit {ref.commit[:7] or ref.object[:7]}, not at {reg.commit[:7]} that registered "
                    f"{version} (moved by hand)")
        else:
            what = f"is a lightweight tag (made again by hand); GTO ignores lightweight tags, so it misses {version}"
        kept = original(tag, lambda t: t.commit == reg.commit)
        if kept:
            problems.append(Problem(tag, what, f"puts back the original tag {kept.object[:7]}",
                                    action=("restore", tag, kept.object, old)))
        else:
            message = tag_message(f"register {tag}", reg.record)
            problems.append(Problem(tag, what, f"makes it again at {reg.commit[:7]} from that commit's record",
                                    action=("remake", tag, reg.commit, message, reg.date,
                                            str(reg.record.get("by") or ""), old)))
    for tag, ref in sorted(refs.items()):
        parsed = _parse(tag, name)
        if parsed.get("action") != Action.REGISTER or parsed["version"] in regs:
            continue
        if ref.record is None:
            problems.append(Problem(tag, f"names no registration: no commit in HEAD's history registers "
                                         f"{parsed['version']} (made by hand)",
                                    f"removes it; `git tag {tag} {ref.commit[:12] or ref.object[:12]}` would make it "
                                    "again", action=("delete", tag, ref.object)))
        else:
            problems.append(Problem(tag, f"names {parsed['version']}, whose registration commit {ref.commit[:7]} is "
                                         "not in HEAD's history (was the branch reset?)", None,
                                    f"put the branch back (git reflog) or delete the tag (git tag -d {tag})"))

    # stages: each tag at a registration commit, annotated, naming the version its record names
    stage_tags = {t: r for t, r in refs.items() if "stage" in _parse(t, name)}
    for tag, ref in sorted(stage_tags.items(), key=lambda kv: _counter(kv[0])):
        parsed = _parse(tag, name)
        version, recorded = by_commit.get(ref.commit), _recorded(ref, parsed)
        if version is not None and ref.annotated and recorded in (None, version):
            continue
        if version is None:
            what = f"points at commit {ref.commit[:7] or ref.object[:7]}, which no version names"
        elif not ref.annotated:
            what = f"is a lightweight tag at {version} (made by hand); GTO ignores it, so {parsed['stage']} reads wrong"
        else:
            what = f"points at {version} but its record names {recorded} (moved by hand)"
        kept = original(tag, lambda t: by_commit.get(t.commit) is not None
                        and _recorded(t, parsed) in (None, by_commit[t.commit]))
        if kept:
            problems.append(Problem(tag, what, f"puts back the original tag {kept.object[:7]}, at "
                                               f"{by_commit[kept.commit]}",
                                    action=("restore", tag, kept.object, ref.object)))
        elif ref.record is None and version is None:
            problems.append(Problem(tag, what, f"removes it; `git tag {tag} {ref.commit[:12] or ref.object[:12]}` "
                                               "would make it again",
                                    action=("delete", tag, ref.object)))
        else:
            problems.append(Problem(tag, what, None, f"its original is gone: delete it (git tag -d {tag}) and "
                                                     f"promote again with `distillery promote`"))

    # stage tags deleted by hand, whose objects are still there
    restorable = set()
    for tag in sorted({t.name for t in gone if "stage" in _parse(t.name, name)} - set(refs), key=_counter):
        parsed = _parse(tag, name)
        kept = original(tag, lambda t: by_commit.get(t.commit) is not None)
        if kept is None:
            continue
        restorable.add(_counter(tag))
        verb = "assigned {} to" if parsed["action"] == Action.ASSIGN else "unassigned {} from"
        problems.append(Problem(tag, f"is missing (deleted by hand); it {verb.format(by_commit[kept.commit])} "
                                     f"{parsed['stage']}", f"puts back the original tag {kept.object[:7]}",
                                action=("restore", tag, kept.object, ZERO)))

    # holes in GTO's counters, with nothing left to restore
    removed = {p.tag for p in problems if p.action[:1] == ("delete",)}
    counters = {_counter(t) for t in stage_tags if t not in removed} | restorable
    for k in sorted(set(range(1, max(counters, default=0) + 1)) - counters):
        problems.append(Problem(f"{name}#<stage>#{k}", "is missing, and no copy of it is left to put back: the "
                                                       "stage history has a hole", None,
                                "nothing to put back; the stages as they are now are consistent, and "
                                "`distillery registry show` lists them", blocking=False))
    return problems


def require_consistent(root: str | os.PathLike, name: str) -> None:
    """RegistryError (one line: the first blocking problem and the doctor command) when `name`'s
    tags were changed by hand."""
    blocking = [p for p in diagnose(root, name) if p.blocking]
    if blocking:
        p = blocking[0]
        more = f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else ""
        raise RegistryError(f"{root}: tag {p.tag} {p.what}{more}; the registry's tags were changed by hand: "
                            f"`distillery registry doctor --registry {root} --name {name}` shows what is wrong "
                            f"and --fix repairs it")


def repair(root: str | os.PathLike, problems: list[Problem], who: str = "", email: str = "") -> list[str]:
    """Do the repairs of `problems` (hold the registry lock); one line per repair done."""
    done = []
    for p in problems:
        if not p.action:
            continue
        kind, tag = p.action[0], p.action[1]
        if kind == "restore":
            _run(root, "update-ref", "-m", "distillery registry doctor", f"refs/tags/{tag}", p.action[2], p.action[3])
        elif kind == "delete":
            _run(root, "update-ref", "-d", f"refs/tags/{tag}", p.action[2])
        elif kind == "remake":
            commit, message, date, actor, old = p.action[2:]
            name, mail = gitops.identity(root, actor or None)
            note = f"\n\nmade again by distillery registry doctor ({who} <{email}> at {gitops.now_utc()})"
            env = gitops.identity_env(name, mail) | {"GIT_COMMITTER_DATE": date}
            if old != ZERO:
                _run(root, "update-ref", "-d", f"refs/tags/{tag}", old)
            gitops.git(root, "tag", "-a", tag, commit, "-m", message + note, env=env)
        done.append(f"{p.tag}: {p.fix}")
    return done
