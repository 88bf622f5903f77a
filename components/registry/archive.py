"""Model folders offered as an archive (tar, tar.gz/bz2/xz, zip): every member checked first.

    members = inspect_archive("model.tar.gz", cfg)          # raises ArtifactRefused, writes nothing
    root = extract_archive("model.tar.gz", tmp_dir, cfg)    # the model folder inside tmp_dir

All members are checked before a single byte is extracted: absolute names, `..` parts,
backslashes, symlinks, hard links, device files and fifos, duplicate names, encrypted zip
members and a total size above `max_artifact_bytes` each refuse the whole archive. Extraction
then writes each member by hand (never `extractall`) with exclusive creates that do not follow
links, into a folder the caller made, and stops at the declared sizes.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from components.registry.config import RegistryConfig
from components.registry.errors import ArtifactRefused


@dataclass(frozen=True)
class Member:
    """One checked archive member: its normalised relative name, whether a folder, its size."""

    name: str
    is_dir: bool
    size: int
    raw: object  # tarfile.TarInfo or zipfile.ZipInfo


def _safe_name(archive: Path, raw_name: str) -> str:
    """The member's name as a clean relative posix path, or ArtifactRefused naming it."""
    where = f"{archive}: member {raw_name!r}"
    if not raw_name or "\x00" in raw_name or any(ord(c) < 32 for c in raw_name):
        raise ArtifactRefused(f"{where}: an empty name or control characters")
    if "\\" in raw_name:
        raise ArtifactRefused(f"{where}: backslashes in member names are refused (Windows path tricks)")
    if raw_name.startswith("/") or (len(raw_name) > 1 and raw_name[1] == ":"):
        raise ArtifactRefused(f"{where}: an absolute path; members must stay inside the archive's folder")
    parts = [p for p in PurePosixPath(raw_name).parts if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactRefused(f"{where}: a '..' path (path traversal); members must stay inside the archive's folder")
    if not parts:
        return ""
    return "/".join(parts)


def _tar_members(path: Path) -> list[Member]:
    out = []
    with tarfile.open(path, "r:*") as tf:
        for info in tf.getmembers():
            name = _safe_name(path, info.name)
            where = f"{path}: member {info.name!r}"
            if info.issym() or info.islnk():
                raise ArtifactRefused(f"{where}: a {'symlink' if info.issym() else 'hard link'} "
                                      f"(to {info.linkname!r}); archives may hold only files and folders")
            if info.ischr() or info.isblk() or info.isfifo() or info.isdev():
                raise ArtifactRefused(f"{where}: a device file or fifo; archives may hold only files and folders")
            if not (info.isreg() or info.isdir()):
                raise ArtifactRefused(f"{where}: an entry of type {info.type!r}; archives may hold only files and folders")
            if name:
                out.append(Member(name, info.isdir(), 0 if info.isdir() else info.size, info))
    return out


def _zip_members(path: Path) -> list[Member]:
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = _safe_name(path, info.filename)
            where = f"{path}: member {info.filename!r}"
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArtifactRefused(f"{where}: a symlink; archives may hold only files and folders")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
                raise ArtifactRefused(f"{where}: a device file or fifo; archives may hold only files and folders")
            if info.flag_bits & 0x1:
                raise ArtifactRefused(f"{where}: encrypted; cannot be checked")
            if name:
                out.append(Member(name, info.is_dir(), 0 if info.is_dir() else info.file_size, info))
    return out


def _is_zip(path: Path) -> bool:
    """Zip by its first bytes. (zipfile.is_zipfile looks for a zip directory anywhere in the
    file, so an uncompressed tar holding a torch.save file would pass for a zip.)"""
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def inspect_archive(archive: str | os.PathLike, cfg: RegistryConfig) -> list[Member]:
    """Check every member of a tar or zip archive without extracting anything."""
    path = Path(archive)
    if not path.is_file():
        raise ArtifactRefused(f"{path}: no such archive file")
    try:
        if _is_zip(path):
            members = _zip_members(path)
        elif tarfile.is_tarfile(path):
            members = _tar_members(path)
        else:
            raise ArtifactRefused(f"{path}: is not a tar or zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise ArtifactRefused(f"{path}: cannot read the archive: {err}") from None
    seen: dict[str, bool] = {}
    for m in members:
        if m.name in seen and not (m.is_dir and seen[m.name]):
            raise ArtifactRefused(f"{path}: member {m.name!r} appears twice; refusing an ambiguous archive")
        seen[m.name] = m.is_dir
    for m in members:  # a file may not also be a folder on another member's path
        parts = m.name.split("/")
        for i in range(1, len(parts)):
            if seen.get("/".join(parts[:i])) is False:
                raise ArtifactRefused(f"{path}: member {m.name!r} lies under {'/'.join(parts[:i])!r}, which is a file")
    total = sum(m.size for m in members)
    if total > cfg.max_artifact_bytes:
        raise ArtifactRefused(f"{path}: declares {total} bytes, above max_artifact_bytes={cfg.max_artifact_bytes}")
    return members


def _write(stream, out: Path, limit: int, where: str) -> int:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    written = 0
    with os.fdopen(fd, "wb") as f:
        while block := stream.read(1 << 20):
            written += len(block)
            if written > limit:
                raise ArtifactRefused(f"{where}: holds more bytes than its header declares")
            f.write(block)
    return written


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, cfg: RegistryConfig) -> Path:
    """Inspect, then extract into the empty folder `dest`; returns the model folder inside it
    (`dest` itself, or its single top folder when the archive wraps the model in one)."""
    path, dest = Path(archive), Path(dest)
    members = inspect_archive(path, cfg)
    if any(dest.iterdir()):
        raise ValueError(f"{dest}: extraction needs an empty folder")
    is_zip = _is_zip(path)
    opener = zipfile.ZipFile(path) if is_zip else tarfile.open(path, "r:*")
    with opener as arc:
        for m in members:
            out = dest / m.name
            if m.is_dir:
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            where = f"{path}: member {m.name!r}"
            if is_zip:
                with arc.open(m.raw) as stream:  # type: ignore[union-attr,arg-type]
                    _write(stream, out, m.size, where)
            else:
                stream = arc.extractfile(m.raw)  # type: ignore[union-attr,arg-type]
                if stream is None:
                    raise ArtifactRefused(f"{where}: has no content to extract")
                with stream:
                    _write(stream, out, m.size, where)
    if (dest / "model.json").exists():
        return dest
    tops = [p for p in dest.iterdir()]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / "model.json").exists():
        return tops[0]
    raise ArtifactRefused(f"{path}: holds no model.json at its top or in a single top folder")
