"""The loader: every format into canonical rows, field mapping, and a DataError for each bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.data.config import SourceConfig
from components.data.load import (
    CANONICAL,
    DataError,
    content_id,
    final_answer,
    inside_folder,
    iter_rows,
    load_canonical,
    load_rows,
    write_jsonl,
)

ROWS = [
    {"id": "a1", "prompt": "What is 2 + 3?", "response": "2 + 3 = <<2+3=5>>5\n#### 5", "answer": "5"},
    {"id": "a2", "prompt": "Zoë has 4 pears, eats 1.", "response": "4 - 1 = 3\n#### 3", "answer": "3"},
    {"id": "a3", "prompt": "Empty answer", "response": None, "answer": None},
]
GSM8K = SourceConfig(fields={"prompt": "question", "response": "answer"})


def pyarrow():
    """pyarrow, or a skip that says why it does not import (e.g. built for another NumPy)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError as err:
        pytest.skip(f"pyarrow does not import in this environment: {err}")
    return pa


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def data_error(path: Path, cfg: SourceConfig | None = None) -> str:
    with pytest.raises(DataError) as info:
        load_rows(path, cfg)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg  # every message names the file first
    return msg


def at_line(msg: str, path: Path, line: int) -> bool:
    return re.match(re.escape(f"{path}:{line}") + r"(?!\d)", msg) is not None


# ---- formats -----------------------------------------------------------------------------------

def test_jsonl_loads_canonical_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    assert write_jsonl(path, ROWS) == 3
    assert load_rows(path) == ROWS
    assert list(iter_rows(path)) == ROWS


def test_jsonl_allows_blank_lines_and_crlf(tmp_path):
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]) + "\r"]
    assert load_rows(write_lines(tmp_path / "r.jsonl", lines)) == ROWS[:2]


def test_json_and_ndjson_suffixes_are_jsonl(tmp_path):
    for suffix in (".json", ".ndjson", ".JSONL"):
        path = tmp_path / f"rows{suffix}"
        write_jsonl(path, ROWS)
        assert load_rows(path) == ROWS


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CANONICAL))
        writer.writeheader()
        writer.writerows(rows)


def test_csv_loads_canonical_rows_empty_cells_as_none(tmp_path):
    path = tmp_path / "rows.csv"
    _write_csv(path, ROWS)
    assert load_rows(path) == ROWS


def test_parquet_loads_canonical_rows(tmp_path):
    pa = pyarrow()
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_rows(path) == ROWS


def test_parquet_numeric_id_and_answer_are_kept_as_text(tmp_path):
    pa = pyarrow()
    import pyarrow.parquet as pq

    path = tmp_path / "rows.pq"
    pq.write_table(pa.table({"id": [7, 8], "prompt": ["p", "q"], "response": ["r", "s"], "answer": [1.5, 2.0]}), path)
    assert load_rows(path) == [{"id": "7", "prompt": "p", "response": "r", "answer": "1.5"},
                               {"id": "8", "prompt": "q", "response": "s", "answer": "2"}]  # integral floats read as integers


def test_text_is_cut_into_chunks(tmp_path):
    path = tmp_path / "corpus.txt"
    text = "abcdefghij" * 5 + " " * 10 + "xyz"  # 63 chars: chunks of 10, one of them all spaces
    path.write_text(text, encoding="utf-8")
    rows = load_rows(path, SourceConfig(text_chunk_chars=10))
    assert [r["prompt"] for r in rows] == ["abcdefghij"] * 5 + ["xyz"]
    assert all(r["response"] == "" and r["answer"] is None for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)  # the same chunk at another offset is another row
    assert [list(r) for r in rows] == [list(CANONICAL)] * len(rows)


def test_format_can_be_forced_whatever_the_suffix(tmp_path):
    path = tmp_path / "rows.data"
    write_jsonl(path, ROWS)
    assert load_rows(path, SourceConfig(format="jsonl")) == ROWS


# ---- mapping -----------------------------------------------------------------------------------

def test_field_mapping_renames_source_columns(tmp_path):
    src = [{"uid": "x", "q": "question?", "a": "because\n#### 12", "final": "12"}]
    path = tmp_path / "m.jsonl"
    write_jsonl(path, src)
    cfg = SourceConfig(fields={"id": "uid", "prompt": "q", "response": "a", "answer": "final"})
    assert load_rows(path, cfg) == [{"id": "x", "prompt": "question?", "response": "because\n#### 12", "answer": "12"}]


def test_gsm8k_mapping_reads_the_answer_after_the_marker_and_makes_content_ids(tmp_path):
    src = [{"question": "Q1?", "answer": "step <<2*3=6>>6\n#### 1,234"},
           {"question": "Q2?", "answer": "a #### fake\nreal\n####  7 "},
           {"question": "Q3?", "answer": "no marker here"},
           {"question": "Q1?", "answer": "step <<2*3=6>>6\n#### 1,234"}]
    path = tmp_path / "gsm.jsonl"
    write_jsonl(path, src)
    rows = load_rows(path, GSM8K)
    assert [r["answer"] for r in rows] == ["1,234", "7", None, "1,234"]
    assert [r["prompt"] for r in rows] == ["Q1?", "Q2?", "Q3?", "Q1?"]
    assert rows[0]["id"] == rows[3]["id"] == content_id("Q1?", src[0]["answer"])
    assert len({r["id"] for r in rows}) == 3
    assert all(re.fullmatch(r"h[0-9a-f]{16}", r["id"]) for r in rows)


def test_empty_id_becomes_a_content_id(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps({**ROWS[0], "id": ""}), json.dumps({**ROWS[1], "id": None})])
    rows = load_rows(path)
    assert rows[0]["id"] == content_id(ROWS[0]["prompt"], ROWS[0]["response"])
    assert rows[1]["id"] == content_id(ROWS[1]["prompt"], ROWS[1]["response"])


def test_numeric_answer_and_id_are_accepted_as_text(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ['{"id": 5, "prompt": "p", "response": "r", "answer": 42}',
                                              '{"id": "b", "prompt": "p", "response": "r", "answer": 2.5}'])
    assert [(r["id"], r["answer"]) for r in load_rows(path)] == [("5", "42"), ("b", "2.5")]


def test_final_answer():
    assert final_answer("x #### 3") == "3"
    assert final_answer("#### 1\n#### 2") == "2"
    assert final_answer("no marker") is None
    assert final_answer("####   ") is None
    assert final_answer(None) is None
    assert final_answer("x => 9", marker="=>") == "9"


# ---- bad inputs: one test each -----------------------------------------------------------------

def test_malformed_json_line_names_the_line(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), '{"id": "x", "prompt": '])
    msg = data_error(path)
    assert at_line(msg, path, 4) and "malformed JSON" in msg


def test_json_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), json.dumps(list(ROWS[1].values()))])
    msg = data_error(path)
    assert at_line(msg, path, 2) and "expected a JSON object, got list" in msg


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["id", "prompt", "response", "answer"]) | st.text(min_size=1, max_size=8),
       nested=st.booleans(), line=st.integers(1, 3))
def test_a_key_named_twice_in_one_object_is_an_error_naming_line_and_key(tmp_path, key, nested, line):
    # json.loads would silently keep the last value; which one the author meant is ambiguous
    twice = f'{{{json.dumps(key)}: 1, {json.dumps(key)}: 2}}'
    bad = ('{"id": "d", "prompt": "p", "response": "r", "answer": "1", "meta": ' + twice + "}" if nested
           else twice[:-1] + ', "zz-id": "d"}')
    lines = [json.dumps(r) for r in ROWS[:2]]
    lines.insert(line - 1, bad)
    path = write_lines(tmp_path / f"dup-{line}.jsonl", lines)
    msg = data_error(path, SourceConfig(strict_columns=False))
    assert at_line(msg, path, line) and "duplicate key" in msg and repr(key)[:20] in msg


def test_the_same_key_in_different_objects_is_fine(tmp_path):
    record = {**ROWS[0], "extra": {"id": 1, "n": {"id": 2}}}
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(record)])
    assert load_rows(path, SourceConfig(strict_columns=False))[0]["prompt"] == ROWS[0]["prompt"]


def test_huge_integer_literal_is_a_data_error(tmp_path):
    # json.loads raises a plain ValueError (not JSONDecodeError) past Python's int digit limit
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), '{"id": ' + "9" * 5000 + "}"])
    msg = data_error(path)
    assert at_line(msg, path, 2) and "malformed JSON" in msg


def test_deeply_nested_json_is_a_data_error(tmp_path):
    # json.loads raises RecursionError on deep nesting; the line is still under max_record_bytes
    path = write_lines(tmp_path / "r.jsonl", ["[" * 100_000])
    msg = data_error(path)
    assert at_line(msg, path, 1) and "malformed JSON" in msg


def test_missing_column_names_it(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), json.dumps({"id": "x", "prompt": "p", "answer": "1"})])
    msg = data_error(path)
    assert at_line(msg, path, 2) and "missing column(s) 'response'" in msg


def test_extra_column_is_an_error_unless_strict_columns_is_off(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), json.dumps({**ROWS[1], "source": "web"})])
    msg = data_error(path)
    assert at_line(msg, path, 2) and "unexpected column(s) 'source'" in msg
    assert load_rows(path, SourceConfig(strict_columns=False)) == ROWS[:2]


def test_keep_columns_are_carried_through_and_not_extra(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps({**ROWS[0], "weight": 0.5}), json.dumps(ROWS[1])])
    rows = load_rows(path, SourceConfig(keep_columns=["weight"]))
    assert rows == [{**ROWS[0], "weight": 0.5}, ROWS[1]]
    path = write_lines(tmp_path / "s.jsonl", [json.dumps({**ROWS[0], "weight": 1, "lang": "en"})])
    msg = data_error(path, SourceConfig(keep_columns=["weight"]))
    assert at_line(msg, path, 1) and "'lang'" in msg and "'weight'" not in msg


@pytest.mark.parametrize("value", [["a", "b"], {"text": "a"}, True, 17, 1.5])
def test_wrong_type_for_prompt_names_the_field(tmp_path, value):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]),
                                              json.dumps({**ROWS[0], "prompt": value})])
    msg = data_error(path)
    assert at_line(msg, path, 3)
    assert f"field 'prompt' must be a string, got {type(value).__name__}" in msg


@pytest.mark.parametrize("field, value", [("answer", True), ("id", False), ("answer", [1]), ("response", 3)])
def test_wrong_type_for_other_fields(tmp_path, field, value):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps({**ROWS[0], field: value})])
    msg = data_error(path)
    assert at_line(msg, path, 1) and f"field {field!r} must be a string" in msg


def test_wrong_type_names_the_source_column_when_mapped(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": 5, "answer": "#### 5"})])
    msg = data_error(path, GSM8K)
    assert at_line(msg, path, 1) and "field 'question'" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert "holds no records" in data_error(path)


def test_blank_lines_only(tmp_path):
    path = write_lines(tmp_path / "blank.jsonl", ["", "   ", "\t", "\r"])
    assert "holds no records" in data_error(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(ROWS[0]), json.dumps(ROWS[1]),
                                              b'{"id": "x", "prompt": "caf\xe9", "response": "r", "answer": "1"}'])
    msg = data_error(path)
    assert at_line(msg, path, 3) and "invalid UTF-8" in msg


def test_a_10mb_line_is_refused_before_json_parsing(tmp_path):
    path = tmp_path / "big.jsonl"
    # not valid JSON either: a parse would report "malformed JSON", the size check must come first
    write_lines(path, [json.dumps(ROWS[0]), '{"prompt": "' + "x" * 10_000_000])
    msg = data_error(path)
    assert at_line(msg, path, 2) and "max_record_bytes" in msg and "malformed" not in msg
    # the limit is configurable: a small one refuses even an ordinary record
    msg = data_error(write_lines(tmp_path / "small.jsonl", [json.dumps(ROWS[0])]), SourceConfig(max_record_bytes=20))
    assert "max_record_bytes" in msg


def test_csv_ragged_rows_name_the_line(tmp_path):
    header = "id,prompt,response,answer"
    long = write_lines(tmp_path / "long.csv", [header, "a,p,r,1", "b,p,r,2,extra"])
    msg = data_error(long)
    assert at_line(msg, long, 3) and "more cells" in msg
    short = write_lines(tmp_path / "short.csv", [header, "a,p,r,1", "b,p,r,2", "c,p"])
    msg = data_error(short)
    assert at_line(msg, short, 4) and "fewer cells" in msg


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    path = write_lines(tmp_path / "q.csv", ["id,prompt,response,answer", 'a,"multi\nline\nprompt",r,1', "b,p,r"])
    msg = data_error(path)
    assert at_line(msg, path, 5) and "fewer cells" in msg


def test_csv_missing_and_extra_columns(tmp_path):
    missing = write_lines(tmp_path / "m.csv", ["id,prompt,response", "a,p,r"])
    msg = data_error(missing)
    assert at_line(msg, missing, 2) and "missing column(s) 'answer'" in msg
    extra = write_lines(tmp_path / "e.csv", ["id,prompt,response,answer,lang", "a,p,r,1,en"])
    msg = data_error(extra)
    assert at_line(msg, extra, 2) and "'lang'" in msg


def test_csv_duplicate_header_and_invalid_utf8(tmp_path):
    dup = write_lines(tmp_path / "d.csv", ["id,prompt,prompt,answer", "a,p,q,1"])
    assert at_line(data_error(dup), dup, 1)
    bad = write_lines(tmp_path / "b.csv", [b"id,prompt,response,answer", b"a,\xff,r,1"])
    assert "invalid UTF-8" in data_error(bad)


def test_parquet_with_an_int_prompt_column(tmp_path):
    pa = pyarrow()
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": [3], "response": ["r"], "answer": ["3"]}), path)
    msg = data_error(path)
    assert "column 'prompt' has type int64" in msg


def test_parquet_row_errors_name_the_row(tmp_path):
    pa = pyarrow()
    import pyarrow.parquet as pq

    path = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["p", "q"], "response": ["r", "s"],
                             "answer": ["1", "2"], "lang": ["en", "de"]}), path)
    msg = data_error(path)
    assert "row 0" in msg and "'lang'" in msg


def test_parquet_missing_column_and_unreadable_file(tmp_path):
    pa = pyarrow()
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"], "answer": ["1"]}), path)
    assert "missing column 'response'" in data_error(path)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all")
    assert "not a readable Parquet file" in data_error(junk)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "rows.xml"
    path.write_text("<rows/>")
    assert "cannot tell the format from the suffix '.xml'" in data_error(path)


def test_missing_file(tmp_path):
    assert "no such file" in data_error(tmp_path / "nope.jsonl")


# ---- properties --------------------------------------------------------------------------------

row_strategy = st.fixed_dictionaries({
    "id": st.text(min_size=1),
    "prompt": st.none() | st.text(),
    "response": st.none() | st.text(),
    "answer": st.none() | st.text(),
})
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(rows=st.lists(row_strategy, min_size=1, max_size=8))
def test_any_unicode_rows_round_trip_through_jsonl(tmp_path, rows):
    path = tmp_path / "rt.jsonl"
    write_jsonl(path, rows)
    assert load_rows(path) == rows


json_fragments = st.sampled_from(
    ['{', '}', '[', ']', '"id"', '"prompt"', '"response"', '"answer"', ':', ',', '"x"', '1', '1e999', 'null',
     'true', 'NaN', '\n', ' ', '"\\u00e9"', '"\\ud800"', '{"id": "a", "prompt": "p", "response": "r", "answer": "1"}']
).map(str.encode)


@FAST
@given(chunks=st.lists(st.binary(max_size=40) | json_fragments, max_size=30))
def test_random_bytes_either_load_or_raise_data_error(tmp_path, chunks):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"".join(chunks))
    try:
        rows = load_rows(path)
    except DataError:
        return
    assert rows and all(list(r) == list(CANONICAL) for r in rows)


csv_text = st.text(min_size=1, alphabet=st.characters(exclude_categories=("Cs",)) | st.sampled_from(',"\n\r '))


@FAST
@given(rows=st.lists(st.fixed_dictionaries({c: csv_text for c in CANONICAL}), min_size=1, max_size=6))
def test_any_text_rows_round_trip_through_csv(tmp_path, rows):
    path = tmp_path / "rt.csv"
    _write_csv(path, rows)
    assert load_rows(path) == rows


# ---- the real GSM8K files ----------------------------------------------------------------------

@pytest.mark.parametrize("split, count", [("train", 7473), ("test", 1319)])
def test_gsm8k_loads_fully(shared_data, split, count):
    rows = load_rows(shared_data / "gsm8k" / f"{split}.jsonl", GSM8K)
    assert len(rows) == count
    for row in rows:
        assert row["prompt"] and row["response"]
        float(row["answer"].replace(",", ""))  # every final answer is a number
        assert row["id"] == content_id(row["prompt"], row["response"])


def test_tinyshakespeare_loads_as_text_chunks(shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    text = path.read_text(encoding="utf-8")
    rows = load_rows(path, SourceConfig(text_chunk_chars=1000))
    assert "".join(r["prompt"] for r in rows) == text  # no chunk of the corpus is blank
    assert len(rows) == -(-len(text) // 1000)


# ---- edge cases found in review ------------------------------------------------------------

def test_byte_order_mark_is_dropped_in_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "bom.csv"
    csv_path.write_bytes("\ufeffid,prompt,response,answer\n1,q,r,5\n".encode("utf-8"))
    assert load_rows(csv_path)[0]["id"] == "1"
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes("\ufeff".encode() + b'{"id": "1", "prompt": "q", "response": "r", "answer": "5"}\n')
    assert load_rows(jsonl)[0]["id"] == "1"


def test_a_folder_is_named_as_such(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        load_rows(tmp_path)


def test_numeric_answers_never_use_exponents(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"id": 1, "prompt": "q", "response": "r", "answer": 1e22}\n'
                    '{"id": 2.0, "prompt": "q", "response": "r", "answer": 0.25}\n', encoding="utf-8")
    rows = load_rows(path)
    assert [r["answer"] for r in rows] == ["10000000000000000000000", "0.25"]
    assert [r["id"] for r in rows] == ["1", "2"]


def test_pandas_index_and_dictionary_columns_in_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "p.parquet"
    df = pd.DataFrame({"id": ["a", "b"], "prompt": ["q1", "q2"], "response": ["r", "r"], "answer": ["1", "2"]},
                      index=[5, 9])
    df["response"] = df["response"].astype("category")
    df.to_parquet(path)
    rows = load_rows(path)
    assert [r["id"] for r in rows] == ["a", "b"] and rows[1]["response"] == "r"


def test_parquet_oversized_record_is_refused(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x" * 2_000_000], "response": ["r"], "answer": ["1"]}), path)
    with pytest.raises(DataError, match="row 0.*max_record_bytes"):
        load_rows(path)


def test_load_canonical_keeps_extra_columns_and_requires_the_canonical_ones(tmp_path):
    from components.data.load import load_canonical

    path = tmp_path / "kept.jsonl"
    write_jsonl(path, [{"id": "a", "prompt": "q", "response": "r", "answer": "1", "weight": 0.5, "source": "x"}])
    assert load_canonical(path) == [{"id": "a", "prompt": "q", "response": "r", "answer": "1", "weight": 0.5,
                                     "source": "x"}]
    write_jsonl(path, [{"id": "a", "prompt": "q", "answer": "1"}])
    with pytest.raises(DataError, match="kept.jsonl:1: missing column.*'response'"):
        load_canonical(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(0, 3), via_folder=st.booleans(), name=st.sampled_from(["train.jsonl", "raw.jsonl", "x.txt"]))
def test_a_symbolic_link_is_followed_only_inside_its_data_folder(tmp_path_factory, depth, via_folder, name):
    root = tmp_path_factory.mktemp("links")
    data = root / "data"
    inner = data.joinpath(*[f"d{i}" for i in range(depth)])
    inner.mkdir(parents=True)
    outside = root / "secret"
    outside.mkdir()
    good = {"id": "a", "prompt": "p", "response": "r", "answer": "1"}
    for folder in (inner, outside):
        write_jsonl(folder / "real.jsonl", [good])
    cfg = SourceConfig(format="jsonl")
    # inside: a link to a file deeper in the same folder is followed
    (data / name).symlink_to(inner / "real.jsonl")
    assert load_rows(data / name, cfg)[0]["id"] == "a" and load_canonical(data / name)[0]["id"] == "a"
    (data / name).unlink()
    # outside: a link to a file elsewhere on the machine is refused
    (data / name).symlink_to(outside / "real.jsonl")
    path = data / name
    for read in (lambda: load_rows(path, cfg), lambda: load_canonical(path)):
        with pytest.raises(DataError, match="outside the data folder") as err:
            read()
        assert str(outside / "real.jsonl") in str(err.value) and "\n" not in str(err.value)
    # the folder the caller names is trusted, links below it must stay below it
    assert inside_folder(path, root) == path
    if via_folder:
        (data / "elsewhere").symlink_to(outside, target_is_directory=True)
        assert load_rows(data / "elsewhere" / "real.jsonl", cfg)  # named as the data folder: trusted
        with pytest.raises(DataError, match="outside the data folder"):
            inside_folder(data / "elsewhere" / "real.jsonl", data)


def test_a_link_into_a_dvc_cache_is_followed(tmp_path):
    cache = tmp_path / "repo" / ".dvc" / "cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    write_jsonl(cache / "cdef", [{"id": "a", "prompt": "p", "response": "r", "answer": "1"}])
    data = tmp_path / "repo" / "data"
    data.mkdir()
    (data / "train.jsonl").symlink_to(cache / "cdef")  # dvc checkout with cache.type: symlink
    assert load_canonical(data / "train.jsonl")[0]["id"] == "a"
