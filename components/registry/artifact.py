"""Model folders the registry accepts: JSON, safetensors and text, never a pickle.

    files = inspect_folder("runs/finetune/model", RegistryConfig())   # raises ArtifactRefused
    copy_model(src, staging, files)                                    # then inspected again
    digest, hashes = model_digest(staging)

A model folder holds model.json, model.safetensors and tokenizer/ (and maybe
quantization.json, metrics.json, check.json). Loading a pickle runs code, so a pickle payload
is refused however it is named: every file is walked as an unpickler would walk it
(pickles.scan_file, sound for every protocol 0-5: it refuses any file from which an unpickler
could reach find_class or persistent_load, and any complete pickle), and containers that a
loader unpacks into a pickle are refused by their magic bytes (torch.save's zip, a tar of
torch's legacy format, NumPy's .npy, and the zlib, gzip, bz2, xz, lzma, lz4 streams joblib.load
recognises by content). File types outside `allowed_suffixes` are refused, every .json must
parse, and every .safetensors must open with the safetensors library (its header covers the
file exactly). One exception to "a complete pickle is refused": a file that opens as
safetensors and whose walk ends at a STOP of plain data (its 8 length bytes happen to spell a
pickle of a number or a string, measured 29 in 20,000 generated checkpoints) is a safetensors
file, and plain data runs no code when unpickled.
Symlinks that leave the folder, symlinks to folders, dangling links and device files,
fifos and sockets are refused. Nothing here writes outside the destination it is given.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from components.registry import pickles
from components.registry.config import RegistryConfig
from components.registry.errors import ArtifactRefused

REQUIRED_FILES = ("model.json", "model.safetensors")
REQUIRED_DIRS = ("tokenizer",)
EVIDENCE = ("metrics.json", "check.json", "registration.json")
"""Files the registry writes itself beside the model; not part of the model's digest."""
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib", ".dill", ".npy", ".npz"})
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
JOBLIB_STREAMS = (("zlib", b"x", zlib.decompressobj), ("gzip", b"\x1f\x8b", lambda: zlib.decompressobj(31)),
                  ("bz2", b"BZ", bz2.BZ2Decompressor),
                  ("xz", b"\xfd7zXZ", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),
                  ("lzma", b"]\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE)))
"""(kind, prefix, decompressor) of the streams joblib.load inflates by content (plus lz4, by its magic)."""


def sniff(path: Path, rel: str) -> None:
    """Refuse `path` if its bytes are a pickle (any protocol), or a zip, tar, .npy or compressed
    stream that a loader (torch.load, numpy.load, joblib.load) unpacks into one, whatever its name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as zf:
                pickled = [n for n in zf.namelist() if n.endswith((".pkl", ".pickle")) or "/data.pkl" in n]
        except zipfile.BadZipFile:
            pickled = []
        if pickled:
            raise ArtifactRefused(f"{rel}: is a pickle payload (a torch.save zip archive holding {pickled[0]}); "
                                  "save the weights with safetensors instead")
        raise ArtifactRefused(f"{rel}: is a zip archive; a model folder holds no archives")
    if head.startswith(NPY_MAGIC):
        raise ArtifactRefused(f"{rel}: is a NumPy .npy array (numpy.load unpickles object arrays); "
                              "only safetensors, JSON and text are accepted")
    if _is_tar(head):
        raise ArtifactRefused(f"{rel}: is a tar archive (torch.load reads pickles from its legacy tar format); "
                              "a model folder holds no archives")
    kind = _compressed(head)
    if kind:
        raise ArtifactRefused(f"{rel}: is {kind}-compressed data (joblib.load decompresses and unpickles such a file "
                              "whatever its name); a model folder holds no compressed files")
    found = pickles.scan_file(path)
    if found is None or (found.opcode == "STOP" and _opens_as_safetensors(path)):
        return
    hint = ""
    if path.suffix.lower() == ".safetensors" and found.offset < 8:
        hint = " (if it is a real safetensors file, its header length reads as pickle opcodes: change __metadata__)"
    raise ArtifactRefused(f"{rel}: is a pickle payload ({found}); only safetensors, JSON and text are accepted{hint}")


def _is_tar(head: bytes) -> bool:
    """A tar header block (its checksum holds), the first member of an uncompressed tar."""
    try:
        tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _compressed(head: bytes) -> str | None:
    """The compression of a file, judged by its first 512 bytes as joblib.load judges it (by its
    prefixes), then confirmed by inflating them: text that starts with "x" or "BZ" fails there.
    A stream cut short still counts (an unpickler reads what inflates before the cut)."""
    if head.startswith(b"\x04\x22\x4d\x18"):
        return "lz4"
    for kind, prefix, inflater in JOBLIB_STREAMS:
        if head.startswith(prefix):
            try:
                out = inflater().decompress(head)
            except (zlib.error, OSError, EOFError, lzma.LZMAError):
                return None
            return kind if out or len(head) == 512 else None
    return None


def _opens_as_safetensors(path: Path) -> bool:
    try:
        _check_safetensors(path, "")
    except ArtifactRefused:
        return False
    return True


def _check_safetensors(path: Path, rel: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            f.keys()
    except Exception as err:  # SafetensorError and friends: the header does not describe the file
        raise ArtifactRefused(f"{rel}: is not a valid safetensors file: {err}") from None


def _check_content(path: Path, rel: str) -> None:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ArtifactRefused(f"{rel}: is not valid JSON: {err}") from None
    elif suffix == ".safetensors":
        _check_safetensors(path, rel)
    elif suffix in (".txt", ".md", ".jinja"):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ArtifactRefused(f"{rel}: is not UTF-8 text: {err}") from None


def _entries(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    """(relative posix path, path, lstat) of everything under `root`, sorted; no link is followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if any(ord(c) < 32 for c in rel) or "\\" in rel:
                raise ArtifactRefused(f"{rel!r}: file names may not hold control characters or backslashes")
            out.append((rel, path, os.lstat(path)))
    return out


def inspect_folder(folder: str | os.PathLike, cfg: RegistryConfig) -> list[str]:
    """Check a model folder without writing anything; returns its files (relative, sorted).

    Raises ArtifactRefused naming the first offending file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ArtifactRefused(f"{root}: is not a model folder (model.json, model.safetensors, tokenizer/)")
    real_root = os.path.realpath(root)
    allowed = {s.lower() for s in cfg.allowed_suffixes}
    files, total = [], 0
    for rel, path, st in _entries(root):
        target = path
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if os.path.commonpath([real_root, real]) != real_root:
                raise ArtifactRefused(f"{rel}: is a symlink leaving the model folder (to {os.readlink(path)})")
            if not os.path.exists(real):
                raise ArtifactRefused(f"{rel}: is a dangling symlink")
            if os.path.isdir(real):
                raise ArtifactRefused(f"{rel}: is a symlink to a folder; only files may be linked")
            target, st = Path(real), os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactRefused(f"{rel}: is not a regular file (a device, fifo or socket)")
        suffix = Path(rel).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ArtifactRefused(f"{rel}: {suffix} is a pickle-based format; only safetensors and JSON are accepted")
        sniff(target, rel)
        if suffix not in allowed:
            raise ArtifactRefused(f"{rel}: file type {suffix or '(none)'!r} is not accepted "
                                  f"(allowed: {', '.join(sorted(allowed))})")
        _check_content(target, rel)
        total += st.st_size
        if total > cfg.max_artifact_bytes:
            raise ArtifactRefused(f"{root}: holds more than max_artifact_bytes={cfg.max_artifact_bytes} bytes")
        files.append(rel)
    for name in REQUIRED_FILES:
        if name not in files:
            raise ArtifactRefused(f"{root / name}: missing; a model folder holds {', '.join(REQUIRED_FILES)} and tokenizer/")
    for name in REQUIRED_DIRS:
        if not any(f.startswith(name + "/") for f in files):
            raise ArtifactRefused(f"{root / name}: missing or empty; the tokenizer is saved with the model")
    if not isinstance(json.loads((root / "model.json").read_text(encoding="utf-8")), dict):
        raise ArtifactRefused(f"{root / 'model.json'}: expected a JSON object of the model's configuration")
    return files


def copy_model(src: str | os.PathLike, dst: str | os.PathLike, files: list[str]) -> list[str]:
    """Copy the model files (not the evidence files) of an inspected folder into `dst`.

    A file that has become a symlink since it was inspected is not followed (O_NOFOLLOW); a
    symlink that was inspected is resolved again and must still stay inside `src`. Returns the
    copied files. The caller inspects the copy again: what is registered is what was checked.
    """
    src, dst = Path(src), Path(dst)
    real_root = os.path.realpath(src)
    copied = []
    for rel in files:
        if rel in EVIDENCE:
            continue
        path = src / rel
        if path.is_symlink():
            real = os.path.realpath(path)
            if os.path.commonpath([real_root, real]) != real_root:
                raise ArtifactRefused(f"{rel}: changed into a symlink leaving the model folder while being copied")
            path = Path(real)
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as err:
            raise ArtifactRefused(f"{rel}: cannot be read safely: {err}") from None
        with os.fdopen(fd, "rb") as fin, open(out, "xb") as fout:
            while block := fin.read(1 << 20):
                fout.write(block)
        os.chmod(out, 0o644)
        copied.append(rel)
    return copied


def model_digest(folder: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """sha256 of the model (every file but the evidence files, names and contents) and of each file."""
    folder = Path(folder)
    hashes = {}
    for rel, path, st in _entries(folder):
        if stat.S_ISREG(st.st_mode) and rel not in EVIDENCE:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            hashes[rel] = h.hexdigest()
    total = hashlib.sha256()
    for rel in sorted(hashes):
        total.update(f"{rel}\0{hashes[rel]}\n".encode())
    return total.hexdigest(), hashes
