"""The registry's git plumbing: commands, who acts, one change at a time, and undo on failure.

    out = git(root, "rev-parse", "HEAD")
    with registry_lock(root, timeout_s=60):          # fcntl.flock on <git-dir>/distillery-registry.lock
        with Transaction(root) as tx:                # any exception: tags deleted (and noted in
                                                     # <git-dir>/distillery-undone-tags), commit and files undone
            ...
    make_tag(root, "lm#production#7", commit, message, who, email)   # dated after every other tag

Why tags are dated by hand: GTO orders a stage's events by their tags' dates, which have
one-second resolution; stage changes in the same second tie, and GTO then misreads the stage
(measured: v1 to production, v2 to production, rollback to v1, all tags in one second: GTO's
`show` and `which` report production empty). GTO's API writes tags through dulwich at the
current time and takes no date, so the registry makes its tags with `git tag -a` and
GIT_COMMITTER_DATE = max(now, newest tag + 1 s). In a burst of changes the tag dates run a few
seconds ahead of the clock; the real time, to the microsecond, is in each tag's message.
Nothing is configured globally: identity goes through GIT_* variables.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from components.registry.errors import RegistryError

LOCK_NAME = "distillery-registry.lock"
TMP_NAME = "distillery-tmp"
UNDONE_NAME = "distillery-undone-tags"
"""Tag objects a failed change deleted again (one id a line): doctor does not take them for tags
deleted by hand."""


def git(root: str | os.PathLike, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run git in `root`; stdout (stripped). A failure raises RegistryError with git's message."""
    full_env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})}
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, env=full_env)
    if check and proc.returncode != 0:
        raise RegistryError(f"git {' '.join(args[:3])} in {root} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout.strip()


def git_dir(root: str | os.PathLike) -> Path:
    return Path(git(root, "rev-parse", "--absolute-git-dir"))


def now_utc() -> str:
    """The current time as UTC ISO 8601 with microseconds, e.g. 2025-01-31T12:00:00.123456Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def identity(root: str | os.PathLike, actor: str | None = None) -> tuple[str, str]:
    """(name, email) of who acts: `actor` ("Name <email>" or a name), else $DISTILLERY_ACTOR,
    else the repository's git user.name / user.email, else the login name ($USER)."""
    actor = actor or os.environ.get("DISTILLERY_ACTOR")
    if actor:
        name, _, rest = actor.partition("<")
        email = rest.rstrip(">").strip()
        name = name.strip() or email
        return name, email or f"{name.replace(' ', '.')}@{socket.gethostname()}"
    name = git(root, "config", "user.name", check=False)
    email = git(root, "config", "user.email", check=False)
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = os.environ.get("USER", "unknown")
    return name, email or f"{name.replace(' ', '.')}@{socket.gethostname()}"


def identity_env(name: str, email: str) -> dict[str, str]:
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email}


@contextlib.contextmanager
def registry_lock(root: str | os.PathLike, timeout_s: float) -> Iterator[None]:
    """Hold an exclusive flock on <git-dir>/distillery-registry.lock (inside .git: never
    committed, never in `git status`). Waits up to `timeout_s`, then RegistryError."""
    path = git_dir(root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryError(f"{path}: another registry change has held the lock for over "
                                        f"{timeout_s:g} s (lock_timeout_s)") from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def scratch_dir(root: str | os.PathLike, clear: bool = False) -> Path:
    """<git-dir>/distillery-tmp: where a version is put together before it is renamed into
    place (same file system, outside the work tree). `clear` removes what a killed process left
    there; call it only while holding the registry lock."""
    path = git_dir(root) / TMP_NAME
    if clear and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(exist_ok=True)
    return path


def last_tag_time(root: str | os.PathLike) -> int:
    stamps = git(root, "for-each-ref", "refs/tags", "--format=%(taggerdate:unix)").split()
    return max((int(s) for s in stamps if s.isdigit()), default=0)


def next_tag_date(root: str | os.PathLike) -> str:
    """GIT_COMMITTER_DATE for a new tag: max(now, newest tag + 1 s), so GTO orders it last.
    Hold the registry lock while making the tag."""
    return f"{max(int(time.time()), last_tag_time(root) + 1)} +0000"


def make_tag(root: str | os.PathLike, tag: str, target: str, message: str, who: str, email: str) -> None:
    """An annotated tag by `who`, dated by `next_tag_date` (plain `git tag -a`). When git wrote
    the tag object but its ref was refused (a hook, a lock), the object is noted as undone."""
    env = identity_env(who, email) | {"GIT_COMMITTER_DATE": next_tag_date(root)}
    try:
        git(root, "tag", "-a", tag, target, "-m", message, env=env)
    except RegistryError:
        record = message.splitlines()[-1]  # the JSON record: its time has microseconds, so it is this tag's
        note_undone(root, [obj for obj, text in unreferenced_tag_objects(root)
                           if f"\ntag {tag}\n" in text and record in text])
        raise


def note_undone(root: str | os.PathLike, objects: list[str]) -> None:
    """Add tag objects this registry deleted again (or never referenced) to <git-dir>/distillery-undone-tags."""
    if objects:
        with open(git_dir(root) / UNDONE_NAME, "a", encoding="utf-8") as ledger:
            ledger.writelines(f"{obj}\n" for obj in objects if obj)


def unreferenced_tag_objects(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, text) of every annotated tag object that no ref holds: tags deleted or moved, kept by
    git until it prunes unreachable objects (two `git cat-file` calls and a `for-each-ref`)."""
    held = set(git(root, "for-each-ref", "--format=%(objectname)").split())
    listing = git(root, "cat-file", "--batch-all-objects", "--batch-check=%(objecttype) %(objectname)")
    ids = [line.split()[1] for line in listing.splitlines() if line.startswith("tag ") and line.split()[1] not in held]
    if not ids:
        return []
    out = subprocess.run(["git", "-C", str(root), "cat-file", "--batch"], input="".join(f"{i}\n" for i in ids).encode(),
                         capture_output=True, check=True).stdout
    found, pos = [], 0
    for obj in ids:
        end = out.index(b"\n", pos)
        size = int(out[pos:end].split()[2])
        found.append((obj, "\n" + out[end + 1:end + 1 + size].decode("utf-8", "replace")))
        pos = end + 1 + size + 1
    return found


def list_tags(root: str | os.PathLike) -> list[str]:
    return sorted(git(root, "tag", "--list").splitlines())


class Transaction:
    """Undo a registry change that fails half-way: created tags are deleted, HEAD goes back to
    where it was, the paths it touched are unstaged and restored (files put back, new folders
    removed). Unrelated work in the repository is left alone."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.head = git(root, "rev-parse", "HEAD")
        self.tags: list[str] = []
        self.files: dict[Path, bytes | None] = {}
        self.dirs: list[Path] = []

    def new_dir(self, path: Path) -> None:
        """`path` is about to be created by this change."""
        self.dirs.append(path)

    def file(self, path: Path) -> None:
        """`path` is about to be written; keep what it held (or that it did not exist)."""
        if path not in self.files:
            self.files[path] = path.read_bytes() if path.exists() else None

    def tag(self, name: str) -> None:
        self.tags.append(name)

    def rollback(self) -> None:
        for name in reversed(self.tags):
            note_undone(self.root, [git(self.root, "rev-parse", "-q", "--verify", f"refs/tags/{name}", check=False)])
            git(self.root, "tag", "-d", name, check=False)
        if git(self.root, "rev-parse", "HEAD", check=False) != self.head:
            git(self.root, "reset", "--soft", self.head, check=False)
        paths = [str(p.relative_to(self.root)) for p in [*self.dirs, *self.files]]
        if paths:
            git(self.root, "reset", "-q", self.head, "--", *paths, check=False)
        for path in reversed(self.dirs):
            shutil.rmtree(path, ignore_errors=True)
        for path, data in self.files.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()
