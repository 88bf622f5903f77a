"""What a step leaves behind: an output folder that appears whole or not at all, and its manifest.

Every step writes into a temporary sibling of its output folder and renames it into place only
when everything succeeded, so a failed or killed step never leaves a half-written output (DVC,
KFP and the CLI all see either the previous complete output or the new one). Inside, the step
writes `manifest.json`: input hashes, parameters, code version and metrics (lineage).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from components.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, sync: bool = False) -> str:
    """The file's SHA-256; with `sync`, also fsynced (the bytes hashed are the bytes on disk)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Hash of a file, or of a folder's files (names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for sub in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(sub.relative_to(path)).encode() + b"\0" + sha256_file(sub).encode())
    return h.hexdigest()


def code_version() -> dict[str, str]:
    """The package version and, when run from a git checkout, the commit and whether it is dirty."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        info = {"package": version("distillery")}
    except PackageNotFoundError:
        info = {"package": "unknown"}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def source_digest() -> str:
    """A digest of the suite's own source (every .py file of pipelines/, components/ and kernels/):
    what a cached step of a local run must have been computed with."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in ("pipelines", "components", "kernels"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class OutputError(InputError, ValueError):
    """An output path that a step refuses to write: it would destroy something it did not make."""


def check_output(final: Path, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse an output folder that is a file, holds or is one of the inputs, or is a folder of
    someone else's (not empty, no manifest.json: not an earlier output of a step)."""
    if not final.name or final.name in (".", ".."):
        raise OutputError(f"{final}: an output folder needs a name of its own")
    resolved = final.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if src == resolved or resolved in src.parents:
            raise OutputError(f"{final}: the output folder would replace the input {item}")
    if final.is_file() or (final.exists() and not final.is_dir()):
        raise OutputError(f"{final}: exists and is not a folder; refusing to replace it")
    if final.is_dir() and not (final / MANIFEST).is_file():
        foreign = [p.name for p in final.iterdir() if not p.name.startswith(".")]
        if foreign:
            raise OutputError(f"{final}: is a folder with other content ({', '.join(sorted(foreign)[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}) and no {MANIFEST}; refusing to replace it")


_HELD: dict[str, tuple[int, int]] = {}  # lock file -> (fd, depth): this process's holds


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return (f"process {int(info['pid'])} on {str(info['host'])[:64]} since {str(info['since'])[:32]} "
                f"({str(info['command'])[:120]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold(folder: str | os.PathLike) -> Iterator[None]:
    """Hold output folder `folder` for this process: a second process (another run of any step
    writing there) is refused at once with an OutputError naming the holder, instead of both
    writing into it. The hold is an flock on `<parent>/.<name>.lock`, which the kernel releases
    when the holder exits however it exits, so a crashed run leaves nothing that blocks the next
    (the file itself is removed on a clean release; a leftover one holds no lock). Re-entrant
    within a process; not a lock across machines unless the file system honours flock (local
    disks and NFSv4 do)."""
    import fcntl
    import socket
    import sys

    folder = Path(folder)
    if not folder.name or folder.name in (".", ".."):
        raise OutputError(f"{folder}: an output folder needs a name of its own")
    lock = folder.parent / f".{folder.name}.lock"
    key = os.path.abspath(lock)
    if key in _HELD:
        fd, depth = _HELD[key]
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"{folder}: in use by {_holder(lock)}; wait for it to finish, or write to "
                              f"another output folder") from None
        try:  # the file we locked may have been removed by a holder releasing it meanwhile: retry
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _HELD[key] = (fd, 1)
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.unlink(lock)  # while still holding it: a waiter that opened this file sees it go, and retries
        except OSError:
            pass
        os.close(fd)


def holds(arg: str) -> Callable[[F], F]:
    """Decorate a step function so that it holds its output folder (the argument named `arg`) while
    it runs; in a distributed run only rank 0 holds it (every rank of one run writes there)."""
    import functools
    import inspect

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if os.environ.get("RANK", "0") != "0":
                return fn(*args, **kwargs)
            with hold(signature.bind(*args, **kwargs).arguments[arg]):
                return fn(*args, **kwargs)
        return run  # type: ignore[return-value]
    return wrap


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread, a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `final`, on error it is removed.

    `final` must be new, empty, or an earlier step output (it has a manifest.json); `inputs`
    may not lie inside it. Hidden files of the folder it replaces (DVC's .gitignore) carry over.
    """
    final = Path(final)
    check_output(final, inputs)
    with hold(final):
        check_output(final, inputs)  # again, now that no other process can be writing it
        yield from _atomic_dir(final)


def _atomic_dir(final: Path) -> Iterator[Path]:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; an output folder is for everyone who may read it
    try:
        yield tmp
        if final.is_dir():
            for hidden in final.glob(".*"):
                if hidden.is_file() and not (tmp / hidden.name).exists():
                    shutil.copy2(hidden, tmp / hidden.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):  # readable by all, as the umask would make them: some writers (safetensors)
        if path.is_file() and not path.is_symlink():  # create their files 0600, unreadable to a server's uid
            path.chmod(path.stat().st_mode | 0o444 & ~_umask())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest(step: str, inputs: dict[str, str | os.PathLike], params: dict[str, Any],
             metrics: dict[str, Any], outputs: dict[str, str | os.PathLike]) -> dict[str, Any]:
    """The lineage record of one step run: what went in (hashed), with what, what came out."""
    return {
        "step": step,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
        "inputs": {name: {"path": str(p), "sha256": sha256_path(p)} for name, p in inputs.items()},
        "params": params,
        "metrics": metrics,
        # outputs sit beside the manifest: recorded by name, so the record survives the rename
        "outputs": {name: {"file": Path(p).name, "sha256": sha256_path(p)} for name, p in outputs.items()},
    }


def write_json(path: str | os.PathLike, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def finish(out_dir: str | os.PathLike, step: str, inputs: dict[str, str | os.PathLike], params: dict[str, Any],
           metrics: dict[str, Any], outputs: dict[str, str | os.PathLike]) -> None:
    """Close a step's (temporary) output folder: `metrics.json` (flat, for `dvc metrics`) and
    `manifest.json` (lineage), written last."""
    out_dir = Path(out_dir)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / MANIFEST, manifest(step, inputs, params, metrics, outputs))
