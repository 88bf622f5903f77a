"""Read raw records (JSONL, Parquet, CSV, plain text) into canonical rows, strictly.

A canonical row is a dict with four string fields: `id`, `prompt`, `response`, `answer` (any of
the last three may be None when the source leaves it empty; the validator quarantines those).
The loader refuses anything structural, naming the file, the line (or row) and the field:
undecodable UTF-8, a malformed JSON line, a key named twice in one JSON object (json would keep
the last silently), a record over `max_record_bytes`, a missing or extra
column, a value of the wrong type, an empty file, a symbolic link out of the file's folder
(`inside_folder`). Content problems (empty text, an answer that
does not parse) are left to the validator, which quarantines rows instead of failing the batch.

GSM8K maps as `fields: {prompt: question, response: answer}`: no answer column, so the answer
is read after the `####` marker of the response; no id column, so the id is a content hash.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from components.data.config import SourceConfig
from components.errors import InputError, excerpt

CANONICAL = ("id", "prompt", "response", "answer")
Row = dict[str, Any]

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                  ".pq": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}


class DataError(InputError, ValueError):
    """Bad input data; the message names the file and, where there is one, the line and field."""


def content_id(prompt: str | None, response: str | None) -> str:
    """A stable id from the content: identical rows share it, so they can never straddle splits."""
    digest = hashlib.sha1(f"{prompt or ''}\x1f{response or ''}".encode("utf-8")).hexdigest()
    return "h" + digest[:16]


def final_answer(response: str | None, marker: str = "####") -> str | None:
    """The text after the last `marker` in `response`, stripped; None when there is no marker."""
    if not response or marker not in response:
        return None
    text = response.rsplit(marker, 1)[1].strip()
    return text or None


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        f"set source.format to one of jsonl, parquet, csv, text") from None


def _canonical(record: dict[str, Any], cfg: SourceConfig, where: str, keep_extra: bool = False) -> Row:
    """Map one source record onto the canonical row, checking columns and value types.

    `keep_extra` (for the pipeline's own files between steps) keeps every unmapped column."""
    mapped = set(cfg.fields.values()) | set(cfg.keep_columns)
    missing = [col for col in cfg.fields.values() if col not in record]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(map(repr, missing))}")
    if cfg.strict_columns and not keep_extra:
        extra = [col for col in record if col not in mapped]
        if extra:
            raise DataError(f"{where}: unexpected column(s) {', '.join(map(repr, extra))}; "
                            f"map them in source.fields or set source.strict_columns: false")
    row: Row = {}
    for name, col in cfg.fields.items():
        value = record[col]
        if value is None or isinstance(value, str):
            row[name] = value
        elif name in ("id", "answer") and isinstance(value, (int, float)) and not isinstance(value, bool):
            row[name] = _number_text(value)  # numeric ids and answers are fine, kept as text
        else:
            raise DataError(f"{where}: field {col!r} must be a string, got {type(value).__name__} {excerpt(value)}")
    if "answer" not in cfg.fields:
        row["answer"] = final_answer(row["response"], cfg.answer_marker)
    if "id" not in cfg.fields or row.get("id") in (None, ""):
        row["id"] = content_id(row["prompt"], row["response"])
    out = {key: row[key] for key in CANONICAL}
    sources = set(cfg.fields.values())
    extras = [c for c in record if c not in sources] if keep_extra else [c for c in cfg.keep_columns if c in record]
    for col in extras:
        out.setdefault(col, record[col])
    return out


def _number_text(value: int | float) -> str:
    """12 -> "12", 12.0 -> "12", 0.5 -> "0.5", 1e22 -> "10000000000000000000000" (no exponent)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else format(value, "f").rstrip("0").rstrip(".")


def _decode(raw: bytes, where: str, first: bool = True) -> str:
    """UTF-8, strictly; a byte-order mark at the very start of the file is dropped."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: invalid UTF-8 at byte {err.start} ({raw[err.start:err.start + 4]!r})") from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object (at any depth) that names a key twice is refused, where
    json.loads would silently keep the last value."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _iter_jsonl(path: Path, cfg: SourceConfig, keep_extra: bool = False) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if len(raw) > cfg.max_record_bytes:
                raise DataError(f"{where}: record is {len(raw):,} bytes, over source.max_record_bytes "
                                f"({cfg.max_record_bytes:,})")
            text = _decode(raw, where, first=lineno == 1).strip()
            if not text:
                continue  # blank lines are allowed between records
            try:
                record = json.loads(text, object_pairs_hook=_unique_keys)
            except _DuplicateKey as err:
                raise DataError(f"{where}: duplicate key {excerpt(err.key)} in one object (which value is meant "
                                f"is ambiguous); keep one") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON at column {err.colno}: {err.msg}") from None
            except (ValueError, RecursionError) as err:  # an integer past Python's digit limit, deep nesting
                raise DataError(f"{where}: malformed JSON: {err}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield _canonical(record, cfg, where, keep_extra)


def _iter_csv(path: Path, cfg: SourceConfig) -> Iterator[Row]:
    raw = path.read_bytes()
    text = _decode(raw, str(path))  # a byte-order mark (Excel's CSV) is dropped
    csv.field_size_limit(max(cfg.max_record_bytes, 1024))
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames
        if header is None:
            return
        if len(set(header)) != len(header):
            raise DataError(f"{path}:1: duplicate column names in header {header}")
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:  # more cells than header columns
                raise DataError(f"{where}: row has more cells than the header's {len(header)} columns")
            if any(v is None for v in record.values()):
                raise DataError(f"{where}: row has fewer cells than the header's {len(header)} columns")
            yield _canonical({k: (v if v != "" else None) for k, v in record.items()}, cfg, where)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None


def _iter_parquet(path: Path, cfg: SourceConfig) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    # pandas writes its index as __index_level_N__ columns: not data
    table = table.select([c for c in table.column_names if not re.fullmatch(r"__index_level_\d+__", c)])

    def texty(t: Any) -> bool:
        if pa.types.is_dictionary(t):
            t = t.value_type
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t))

    for name in cfg.fields.values():
        if name not in table.column_names:
            raise DataError(f"{path}: missing column {name!r} (columns: {table.column_names})")
        col_type = table.schema.field(name).type
        numeric_ok = name in (cfg.fields.get("id"), cfg.fields.get("answer")) and (
            pa.types.is_integer(col_type) or pa.types.is_floating(col_type))
        if not (texty(col_type) or numeric_ok):
            raise DataError(f"{path}: column {name!r} has type {col_type}, expected string")
    for i, record in enumerate(table.to_pylist()):
        where = f"{path}: row {i}"
        size = sum(len(v) for v in record.values() if isinstance(v, str))
        if size > cfg.max_record_bytes:
            raise DataError(f"{where}: record holds {size:,} characters, over source.max_record_bytes "
                            f"({cfg.max_record_bytes:,})")
        yield _canonical(record, cfg, where)


def _iter_text(path: Path, cfg: SourceConfig) -> Iterator[Row]:
    text = _decode(path.read_bytes(), str(path))
    step = cfg.text_chunk_chars
    for start in range(0, len(text), step):
        chunk = text[start:start + step]
        if chunk.strip():
            yield {"id": content_id(chunk, f"@{start}"), "prompt": chunk, "response": "", "answer": None}


def inside_folder(path: str | os.PathLike, folder: str | os.PathLike | None = None) -> Path:
    """`path`, refused (DataError) when symbolic links take it out of its data folder `folder`
    (default: the folder it is named in). A link is followed only when its target, every link
    resolved, lies inside that folder, or inside a DVC cache (`.../.dvc/cache/...`, where
    `dvc checkout` with cache.type symlink points); a link elsewhere on the machine, however it
    is named, is not read: a data file must not become a way to read /etc/shadow or an SSH key
    into a training set or an error message."""
    path = Path(path)
    folder = Path(folder) if folder is not None else path.parent
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) == root:
        return path
    parts = Path(real).parts
    if any(parts[i:i + 2] == (".dvc", "cache") for i in range(len(parts) - 1)):
        return path
    raise DataError(f"{path}: is a symbolic link to {real}, outside the data folder {folder}; links are followed "
                    f"only inside it (or into a DVC cache): copy the file in, or give its real path")


def iter_rows(path: str | os.PathLike, cfg: SourceConfig | None = None) -> Iterator[Row]:
    """Canonical rows of `path`, lazily; raises DataError on the first structural problem."""
    cfg = cfg or SourceConfig()
    path = inside_folder(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give the data file inside it")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = detect_format(path, cfg.format)
    readers = {"jsonl": _iter_jsonl, "csv": _iter_csv, "parquet": _iter_parquet, "text": _iter_text}
    yield from readers[fmt](path, cfg)


def load_rows(path: str | os.PathLike, cfg: SourceConfig | None = None) -> list[Row]:
    """All canonical rows of `path`; an input with no records is an error."""
    rows = list(iter_rows(path, cfg))
    if not rows:
        raise DataError(f"{path}: the file holds no records")
    return rows


def load_canonical(path: str | os.PathLike) -> list[Row]:
    """Rows of a canonical JSONL file that a step wrote (raw.jsonl, clean.jsonl, kept.jsonl):
    the four canonical columns are required and every further column (a `weight`, a column the
    source mapping kept) travels on unchanged."""
    path = inside_folder(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.is_dir() else f"{path}: is a folder; give the data file inside it")
    rows = list(_iter_jsonl(path, SourceConfig(), keep_extra=True))
    if not rows:
        raise DataError(f"{path}: the file holds no records")
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[Row]) -> int:
    """Write rows as JSON lines (UTF-8, keys in order); returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
