"""The model registry: versions in git, stages as GTO tags, promotion through a gate, rollback.

    reg = Registry.init("registry")                           # git init + .gto (stages) + commit
    v = reg.register("runs/finetune/model", "lm").version      # validates, commits, tags lm@v0.0.1
    reg.promote("lm", v, to="staging")                         # gate vs production, tag lm#staging#N
    reg.promote("lm", v, to="production")                      # only what staging holds
    reg.rollback("lm")                                         # production back to the version before
    reg.path("lm", reg.current("lm", "production"))            # the folder serving exports

Layout of the registry repository (GTO 1.10: `.gto` config, `artifacts.yaml` index):

    .gto                          stages: [staging, production], types: [model]
    artifacts.yaml                lm: {type: model, path: models/lm}
    models/lm/v0.0.1/             model.json, model.safetensors, tokenizer/, ...  (immutable)
                     metrics.json, check.json, registration.json (digest, per-file sha256, who, when)

Tags (all annotated; GTO reads them: gto show / gto history / gto which):

    lm@v0.0.1            registers the version at the commit that added its folder
    lm#staging#4         assigns a stage (GTO's counter N runs over all of lm's tags)
    lm#production!#5     unassigns it from the version it replaces, so one version holds a stage

Each tag's message is a summary line, a blank line and one JSON line with the action, who
(name <email>), when (UTC ISO), the version's metrics, the stage it leaves, and the gate report.

How GTO is used: tag names come from GTO's own `gto.tag.name_tag` and everything is read back
through GTO (`GitRegistry.get_state().which` for the stages, `gto.api.history` for rollback),
so `gto show` sees what the registry sees. Tags are written with `git tag -a`, not GTO's API:
GTO writes through dulwich, which takes no tag date (see gitops: stage changes in one second
must not tie), skips git's hooks and tag signing config, and GTO's `register` re-reads the whole
history twice (measured 0.5 s per registration at 20 versions, 0.1 s with `git tag`).

Departures from plain GTO, and why: (1) a stage holds one version: promoting assigns the new
version, then unassigns the old, so `gto which` (newest semver in a stage) and `gto show`
(newest assignment) agree; (2) tags get strictly increasing dates (gitops.make_tag);
(3) rollback pops a stack replayed from the stage's assignment tags in counter order, so
rolling back twice goes two versions back, not back and forth; (4) a version's metrics are
read from the tagged commit, not the work tree, so an edited metrics.json in the work tree
cannot change a gate decision; (5) before a stage is read or changed, the tags are checked
against the registry's records (doctor.py): a tag deleted or moved by hand is named, and
`distillery registry doctor --fix` puts it back. Registering the same model files again returns
the existing version (content-addressed by the model digest) and changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.registry import artifact as art
from components.registry import gitops
from components.registry.archive import extract_archive
from components.registry.config import NAME_RE, STAGES, GateConfig, RegistryConfig
from components.registry.doctor import Problem, diagnose, repair, require_consistent
from components.registry.errors import ArtifactRefused, GateError, RegistryError, RollbackError
from components.registry.gate import GateReport, evaluate_gate
from components.registry.gitops import git
from components.registry.records import check_check, check_metrics, load_report, parse_message, tag_message

VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
GTO_CONFIG = "stages: [staging, production]\ntypes: [model]\n"


@dataclass
class Registration:
    """What `register` did: the version (new, or the existing one with the same model files)."""

    name: str
    version: str
    path: Path
    digest: str
    changed: bool
    tag: str


@dataclass
class StageChange:
    """What `promote` or `rollback` did: status is promoted, rolled_back or unchanged."""

    name: str
    stage: str
    version: str
    previous: str | None
    status: str
    tags: list[str] = field(default_factory=list)
    report: GateReport | None = None


class Registry:
    """A GTO model registry in the git repository `root` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, config: RegistryConfig | None = None, actor: str | None = None):
        self.root = Path(root).absolute()
        self.config = config or RegistryConfig(root=str(root))
        self.actor = actor
        """Who acts ("Name <email>") when a call names no actor; see gitops.identity for the fallbacks."""
        if not (self.root / ".gto").is_file() or git(self.root, "rev-parse", "--show-toplevel", check=False) \
                != str(self.root.resolve()):
            raise RegistryError(f"{self.root}: not a model registry (no git repository with .gto at its top); "
                                f"a `distillery run --out X` keeps its registry in X/registry: give "
                                f"--registry X/registry (or `distillery registry init` makes one here)")
        self.root = self.root.resolve()

    @classmethod
    def init(cls, root: str | os.PathLike, config: RegistryConfig | None = None, actor: str | None = None) -> Registry:
        """Make `root` a registry: `git init` unless it is a repository's top already, then a
        commit adding .gto. Idempotent: an existing registry is opened unchanged."""
        root = Path(root).absolute()
        root.mkdir(parents=True, exist_ok=True)
        if git(root, "rev-parse", "--show-toplevel", check=False) != str(root.resolve()):
            git(root, "init", "-q", "--initial-branch=main")
        if not (root / ".gto").is_file():
            (root / ".gto").write_text(GTO_CONFIG, encoding="utf-8")
            who, email = gitops.identity(root, actor)
            git(root, "add", "--", ".gto")
            git(root, "commit", "-q", "-m", f"registry: create ({who} <{email}> at {gitops.now_utc()})", "--", ".gto",
                env=gitops.identity_env(who, email))
        return cls(root, config, actor)

    # ---- reading ----------------------------------------------------------------------------

    def _name(self, name: str | None) -> str:
        name = name or self.config.name
        if not NAME_RE.match(name):
            raise RegistryError(f"name {name!r}: letters, digits, '-' or '_', starting and ending with a letter or digit")
        return name

    def _tag_exists(self, tag: str) -> bool:
        return bool(git(self.root, "rev-parse", "-q", "--verify", f"refs/tags/{tag}", check=False))

    def versions(self, name: str | None = None) -> list[str]:
        """Registered versions of `name`, oldest first (semver order)."""
        name = self._name(name)
        found = []
        for tag in gitops.list_tags(self.root):
            base, sep, version = tag.partition("@")
            if sep and base == name and VERSION_RE.match(version):
                found.append(version)
        return sorted(found, key=lambda v: tuple(int(x) for x in v[1:].split(".")))

    def _require_version(self, name: str, version: str) -> None:
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise RegistryError(f"version {version!r}: expected the form v1.2.3")
        if not self._tag_exists(f"{name}@{version}"):
            raise RegistryError(f"{name}@{version}: no such registered version "
                                f"(registered: {', '.join(self.versions(name)) or 'none'})")

    def stages(self, name: str | None = None) -> dict[str, str | None]:
        """{stage: the version it holds, or None}, as GTO reads the tags (one read of GTO's state:
        GTO's which with one version per stage, the newest semver among active assignments)."""
        from gto.constants import ASSIGNMENTS_PER_VERSION, VERSIONS_PER_STAGE
        from gto.exceptions import ArtifactNotFound
        from gto.registry import GitRegistry

        name = self._name(name)
        out: dict[str, str | None] = dict.fromkeys(STAGES)
        with GitRegistry.from_url(str(self.root)) as gto_reg:
            state = gto_reg.get_state()
        for stage in STAGES:
            try:
                found = state.which(name, stage, raise_if_not_found=False, assignments_per_version=ASSIGNMENTS_PER_VERSION,
                                    versions_per_stage=VERSIONS_PER_STAGE)
            except ArtifactNotFound:
                return out
            if found:
                out[stage] = (found[0] if isinstance(found, list) else found).version
        return out

    def current(self, name: str | None = None, stage: str = "production") -> str | None:
        """The version `stage` holds, as GTO reads the tags; None when it holds none."""
        if stage not in STAGES:
            raise RegistryError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
        require_consistent(self.root, self._name(name))
        return self.stages(name)[stage]

    def path(self, name: str | None, version: str) -> Path:
        """The folder of a registered version (what serve.export reads)."""
        name = self._name(name)
        self._require_version(name, version)
        folder = self.root / "models" / name / version
        if not (folder / "model.safetensors").is_file():
            raise RegistryError(f"{folder}: the files of {name}@{version} are missing from the work tree")
        return folder

    def serving_path(self, name: str | None = None, stage: str = "production") -> Path | None:
        """Serving follows the stage: the folder of the version `stage` holds, or None."""
        version = self.current(name, stage)
        return None if version is None else self.path(name, version)

    def _show(self, name: str, version: str, file: str) -> dict[str, Any]:
        text = git(self.root, "show", f"refs/tags/{name}@{version}:models/{name}/{version}/{file}")
        return json.loads(text)

    def _digests(self, name: str) -> dict[str, str]:
        """{version: model digest} from each version's registration.json (one `git cat-file`)."""
        versions = self.versions(name)
        if not versions:
            return {}
        query = "".join(f"refs/tags/{name}@{v}:models/{name}/{v}/registration.json\n" for v in versions)
        out = subprocess.run(["git", "-C", str(self.root), "cat-file", "--batch"], input=query.encode(),
                             capture_output=True, check=True).stdout
        digests, pos = {}, 0
        for v in versions:
            end = out.index(b"\n", pos)
            header = out[pos:end].split()
            pos = end + 1
            if len(header) == 3 and header[1] == b"blob":
                size = int(header[2])
                digests[v] = json.loads(out[pos:pos + size]).get("digest", "")
                pos += size + 1
        return digests

    def evidence(self, name: str | None, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metrics, check report) of a version, read from its tagged commit."""
        name = self._name(name)
        self._require_version(name, version)
        return self._show(name, version, "metrics.json"), self._show(name, version, "check.json")

    def verify(self, name: str | None, version: str) -> str:
        """Hash the version's work-tree files against the digest recorded at registration."""
        folder = self.path(name, version)
        recorded = self._show(self._name(name), version, "registration.json")
        digest, hashes = art.model_digest(folder)
        if digest != recorded["digest"]:
            changed = sorted(k for k in set(hashes) | set(recorded["files"]) if hashes.get(k) != recorded["files"].get(k))
            raise RegistryError(f"{folder}: files differ from those registered: {', '.join(changed)}")
        return digest

    def history(self, name: str | None = None) -> list[dict[str, Any]]:
        """GTO's events of `name`, oldest first, each with its parsed JSON record (or None)."""
        import gto.api

        name = self._name(name)
        events = gto.api.history(str(self.root), name, ascending=True)
        return [dict(e) | {"record": parse_message(e.get("message"))} for e in events]

    # ---- changing ---------------------------------------------------------------------------

    def _check_stage(self, stage: str) -> None:
        """`stage` must be one of ours and, when .gto lists stages, one of those too."""
        import gto.api

        if stage not in STAGES:
            raise RegistryError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
        allowed = gto.api.get_stages(str(self.root), allowed=True)
        if allowed and stage not in allowed:
            raise RegistryError(f"{self.root / '.gto'}: stages lists {', '.join(allowed)} but not {stage!r}")

    def _check_clean(self, name: str) -> None:
        dirty = git(self.root, "status", "--porcelain", "--untracked-files=all", "--",
                    f"models/{name}", "artifacts.yaml", ".gto")
        if dirty:
            raise RegistryError(f"{self.root}: uncommitted changes in registry files ({dirty.splitlines()[0].strip()}"
                                f"{', ...' if len(dirty.splitlines()) > 1 else ''}); commit or remove them first")

    def register(self, model_folder: str | os.PathLike, name: str | None = None,
                 metrics: dict | str | os.PathLike | None = None, check: dict | str | os.PathLike | None = None,
                 *, version: str | None = None, actor: str | None = None) -> Registration:
        """Validate a model folder and register it as a new version (or return the version that
        holds the same model files). `metrics` / `check`: a dict, a JSON file, or None for the
        folder's metrics.json / check.json. Refusals change nothing."""
        name = self._name(name)
        src = Path(model_folder)
        files = art.inspect_folder(src, self.config)
        metrics_d, m_where = load_report(metrics, src / "metrics.json", "metrics")
        check_d, c_where = load_report(check, src / "check.json", "serve.check report")
        check_metrics(metrics_d, m_where)
        check_check(check_d, c_where)
        if version is not None and not VERSION_RE.match(version):
            raise RegistryError(f"version {version!r}: expected the form v1.2.3")
        with gitops.registry_lock(self.root, self.config.lock_timeout_s):
            self._check_clean(name)
            scratch = gitops.scratch_dir(self.root, clear=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch))
            try:
                art.copy_model(src, staging, files)
                art.inspect_folder(staging, self.config)
                digest, hashes = art.model_digest(staging)
                for old, old_digest in self._digests(name).items():
                    if old_digest == digest:
                        return Registration(name, old, self.root / "models" / name / old, digest, False, f"{name}@{old}")
                return self._commit_version(name, version, staging, src, metrics_d, check_d, digest, hashes, actor)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _next_version(self, name: str) -> str:
        taken = [v for v in self.versions(name)]
        for tag in gitops.list_tags(self.root):  # deregistered or hand-made tags take their number too
            m = re.match(rf"^{re.escape(name)}@(v\d+\.\d+\.\d+)", tag)
            if m and VERSION_RE.match(m.group(1)):
                taken.append(m.group(1))
        if not taken:
            return "v0.0.1"
        major, minor, patch = max(tuple(int(x) for x in v[1:].split(".")) for v in taken)
        return f"v{major}.{minor}.{patch + 1}"

    def _commit_version(self, name: str, version: str | None, staging: Path, src: Path, metrics: dict, check: dict,
                        digest: str, hashes: dict[str, str], actor: str | None) -> Registration:
        from gto.constants import Action
        from gto.index import RepoIndexManager
        from gto.tag import name_tag

        version = version or self._next_version(name)
        tag = name_tag(Action.REGISTER, name, version=version, simple=True)  # GTO's own format: lm@v0.0.1
        final = self.root / "models" / name / version
        if self._tag_exists(tag) or final.exists():
            raise RegistryError(f"{tag}: already exists; versions are immutable, pick another version")
        who, email = gitops.identity(self.root, actor or self.actor)
        when = gitops.now_utc()
        record = {"action": "register", "artifact": name, "version": version, "digest": digest,
                  "by": f"{who} <{email}>", "at": when, "metrics": metrics, "check_passed": check["passed"]}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        (staging / "check.json").write_text(json.dumps(check, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        registration = {"name": name, "version": version, "digest": digest, "files": hashes,
                        "registered_by": f"{who} <{email}>", "registered_at": when, "source": str(src)}
        (staging / "registration.json").write_text(json.dumps(registration, indent=1, sort_keys=True) + "\n",
                                                   encoding="utf-8")
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(0o444)  # a registered version is never edited in place (verify() checks)
        index = self.root / "artifacts.yaml"
        with gitops.Transaction(self.root) as tx:
            top = final
            while not top.parent.exists():
                top = top.parent
            tx.new_dir(top)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, final)
            tx.file(index)
            with RepoIndexManager.from_url(str(self.root)) as manager:
                if name not in manager.get_index().state:
                    manager.add(name, type="model", path=f"models/{name}", must_exist=False, allow_same_path=False,
                                labels=[], description="distillery language model", custom=None, update=False)
            paths = [str(final.relative_to(self.root)), "artifacts.yaml"]
            env = gitops.identity_env(who, email)
            git(self.root, "add", "--", *paths)
            git(self.root, "commit", "-q", "-m", tag_message(f"registry: register {tag}", record), "--", *paths, env=env)
            commit = git(self.root, "rev-parse", "HEAD")
            gitops.make_tag(self.root, tag, commit, tag_message(f"register {tag}", record), who, email)
            tx.tag(tag)  # only once made: a failed `git tag` may have met someone else's tag
        return Registration(name, version, final, digest, True, tag)

    def register_archive(self, archive: str | os.PathLike, name: str | None = None,
                         metrics: dict | str | os.PathLike | None = None, check: dict | str | os.PathLike | None = None,
                         *, version: str | None = None, actor: str | None = None) -> Registration:
        """Register a model offered as a tar or zip archive. Every member is checked before
        anything is extracted (archive.inspect_archive); extraction goes to a private temporary
        folder outside the registry, which is then registered like a folder and removed."""
        self._name(name)
        with tempfile.TemporaryDirectory(prefix="distillery-archive-") as tmp:
            folder = extract_archive(archive, tmp, self.config)
            return self.register(folder, name, metrics, check, version=version, actor=actor)

    def _stage_tags(self, tx: gitops.Transaction, name: str, stage: str, assign: tuple[str, str] | None,
                    unassign: tuple[str, str] | None, who: str, email: str) -> list[str]:
        """Assign (version, message) first, then unassign (version, message): a process killed
        in between leaves the new version in the stage (and, for a moment, the old one too).
        Tag names come from GTO's own `name_tag` (counter over all of the artifact's tags)."""
        from gto.constants import Action
        from gto.tag import name_tag
        from scmrepo.git import Git

        made = []
        for action, item in ((Action.ASSIGN, assign), (Action.UNASSIGN, unassign)):
            if item is None:
                continue
            version, message = item
            with Git(str(self.root)) as scm:
                tag = name_tag(action, name, stage=stage, scm=scm, simple=False)
            commit = git(self.root, "rev-parse", f"refs/tags/{name}@{version}^{{commit}}")
            gitops.make_tag(self.root, tag, commit, message, who, email)
            tx.tag(tag)
            made.append(tag)
        return made

    def promote(self, name: str | None, version: str, to: str = "staging", gate: GateConfig | None = None,
                *, actor: str | None = None, note: str = "") -> StageChange:
        """Move `version` into stage `to` if the gate passes (GateError lists every comparison
        and nothing changes). Promoting a version already there changes nothing ("unchanged").

        The gate compares with the production version of this moment (for `to="production"`
        too, in case production moved since the version was staged); a candidate that is the
        production version itself (staging it again after a rollback) meets only the absolute
        rules: it cannot be worse than itself."""
        name = self._name(name)
        gate = gate or self.config.gate
        self._check_stage(to)
        with gitops.registry_lock(self.root, self.config.lock_timeout_s):
            require_consistent(self.root, name)
            self._require_version(name, version)
            held = self.stages(name)
            holder, staged, production = held[to], held["staging"], held["production"]
            if holder == version:
                return StageChange(name, to, version, holder, "unchanged")
            if to == "production" and self.config.production_requires_staging and staged != version:
                raise RegistryError(f"{name}@{version}: not in staging (staging holds {staged or 'nothing'}); "
                                    "promote it to staging first")
            cand_metrics, cand_check = self.evidence(name, version)
            prod_metrics = self.evidence(name, production)[0] if production and production != version else None
            report = evaluate_gate(gate, cand_metrics, prod_metrics, cand_check, version,
                                   production if prod_metrics is not None else None)
            if not report.passed:
                raise GateError(f"{name}@{version} not promoted to {to}: the gate failed\n{report.table()}", report)
            who, email = gitops.identity(self.root, actor or self.actor)
            record = {"action": "promote", "artifact": name, "version": version, "stage": to, "from": holder,
                      "by": f"{who} <{email}>", "at": gitops.now_utc(), "metrics": cand_metrics,
                      "production": report.production, "production_metrics": prod_metrics,
                      "gate": report.as_dict(), "note": note}
            summary = f"promote {name} {version} to {to}" + (f" (replacing {holder})" if holder else "")
            with gitops.Transaction(self.root) as tx:
                tags = self._stage_tags(tx, name, to, (version, tag_message(summary, record)),
                                        (holder, tag_message(f"{summary}: {holder} leaves {to}",
                                                             record | {"action": "replace"})) if holder else None,
                                        who, email)
            return StageChange(name, to, version, holder, "promoted", tags, report)

    def stage_stack(self, name: str | None = None, stage: str = "production") -> list[str]:
        """The versions `stage` went through, replayed from its assignment tags in GTO counter
        order: a promotion pushes, a rollback pops; the last entry is the current version."""
        from gto.api import parse_tag

        name = self._name(name)
        require_consistent(self.root, name)
        assigns = [e for e in self.history(name) if e["event"] == "assignment" and e["stage"] == stage]
        assigns.sort(key=lambda e: parse_tag(e["ref"]).get("counter", 0))
        stack: list[str] = []
        for e in assigns:
            record = e["record"] or {}
            if record.get("action") == "rollback" and stack:
                stack.pop()
            if not stack or stack[-1] != e["version"]:
                stack.append(e["version"])
        return stack

    def doctor(self, name: str | None = None, fix: bool = False, *, actor: str | None = None
               ) -> tuple[list[Problem], list[str]]:
        """(problems, repairs done) of the tags changed by hand (see doctor.py); with `fix`, the
        repairs are made under the registry lock and the problems are those left after them."""
        name = self._name(name)
        if not fix:
            return diagnose(self.root, name), []
        with gitops.registry_lock(self.root, self.config.lock_timeout_s):
            done = repair(self.root, diagnose(self.root, name), *gitops.identity(self.root, actor or self.actor))
            return diagnose(self.root, name), done

    def rollback(self, name: str | None = None, stage: str = "production", *, actor: str | None = None,
                 note: str = "") -> StageChange:
        """Give `stage` back to the version it held before the current one (no gate: this is
        the way back). RollbackError when there is no earlier version."""
        name = self._name(name)
        self._check_stage(stage)
        with gitops.registry_lock(self.root, self.config.lock_timeout_s):
            holder = self.current(name, stage)
            if holder is None:
                raise RollbackError(f"{name}: {stage} holds no version; nothing to roll back")
            stack = self.stage_stack(name, stage)
            if stack[-1:] != [holder]:
                raise RegistryError(f"{name}: {stage} holds {holder} but its tag history ends with "
                                    f"{stack[-1] if stack else 'nothing'}; the tags were changed outside the registry")
            if len(stack) < 2:
                raise RollbackError(f"{name}: {stage} has had only {holder}; there is no previous version to roll back to")
            previous = stack[-2]
            self.path(name, previous)  # its files must still be there
            who, email = gitops.identity(self.root, actor or self.actor)
            record = {"action": "rollback", "artifact": name, "version": previous, "stage": stage, "from": holder,
                      "by": f"{who} <{email}>", "at": gitops.now_utc(), "metrics": self.evidence(name, previous)[0],
                      "reason": f"rollback from {holder} to {previous}", "note": note}
            summary = f"rollback {name} {stage} from {holder} to {previous}"
            with gitops.Transaction(self.root) as tx:
                tags = self._stage_tags(tx, name, stage, (previous, tag_message(summary, record)),
                                        (holder, tag_message(f"{summary}: {holder} leaves {stage}",
                                                             record | {"action": "rolled_back"})), who, email)
            return StageChange(name, stage, previous, holder, "rolled_back", tags)


__all__ = ["Registry", "Registration", "StageChange", "RegistryError", "ArtifactRefused", "GateError",
           "RollbackError", "tag_message", "parse_message"]
