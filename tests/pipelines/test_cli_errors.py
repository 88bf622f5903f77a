"""Bad input through the real CLI: a clear error naming the file/line/field, a non-zero exit,
and nothing written (no output folder, no temporary leftovers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main

GOOD = {"id": "a", "prompt": "Ann has 3 apples. She buys 2 more. How many?", "response": "3 + 2 = 5\n#### 5",
        "answer": "5"}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, fragments the error message must contain)."""
    cases = {}
    p = tmp / "malformed.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + '{"id": "b", "prompt": "x"\n', encoding="utf-8")
    cases["malformed JSON line"] = (p, ["malformed.jsonl:2", "malformed JSON"])
    cases["missing column"] = (_jsonl(tmp / "missing.jsonl", [GOOD, {k: v for k, v in GOOD.items() if k != "answer"}]),
                               ["missing.jsonl:2", "'answer'"])
    cases["extra column"] = (_jsonl(tmp / "extra.jsonl", [{**GOOD, "label": 1}]), ["extra.jsonl:1", "'label'"])
    cases["wrong type"] = (_jsonl(tmp / "type.jsonl", [GOOD, GOOD, {**GOOD, "prompt": ["a", "list"]}]),
                           ["type.jsonl:3", "'prompt'", "list"])
    p = tmp / "empty.jsonl"
    p.write_bytes(b"")
    cases["empty file"] = (p, ["empty.jsonl", "no records"])
    p = tmp / "utf8.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "c", "prompt": "caf\xe9"}\n')
    cases["invalid UTF-8"] = (p, ["utf8.jsonl:2", "invalid UTF-8"])
    p = tmp / "huge.jsonl"
    p.write_text(json.dumps({**GOOD, "prompt": "x" * 10_000_000}) + "\n", encoding="utf-8")
    cases["10 MB single line"] = (p, ["huge.jsonl:1", "max_record_bytes"])
    return cases


@pytest.mark.parametrize("case", ["malformed JSON line", "missing column", "extra column", "wrong type",
                                  "empty file", "invalid UTF-8", "10 MB single line"])
def test_bad_input_is_refused_with_nothing_written(tmp_path, capsys, case):
    path, fragments = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    assert main(["validate", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{case}: {fragment!r} not in {err!r}"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_unknown_params_key_names_it(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny\nfilter:\n  near_dup_treshold: 0.8\npresets:\n  tiny: {}\n", encoding="utf-8")
    out = tmp_path / "raw.jsonl"
    assert main(["data", "generate", "--out", str(out), "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "filter.near_dup_treshold" in err and "near_dup_threshold" in err
    assert not out.exists()


def test_mistyped_override_names_it(tmp_path, capsys):
    out = tmp_path / "raw.jsonl"
    assert main(["data", "generate", "--out", str(out), "--set", "generate.rows=many"]) == 2
    assert "generate.rows" in capsys.readouterr().err
    assert not out.exists()


def test_gate_failure_exits_nonzero_and_writes_only_the_rejected_report(tmp_path, capsys):
    rows = [{**GOOD, "id": str(i), "answer": "N/A"} for i in range(10)]  # every row fails a row check
    src = _jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "validated"
    assert main(["validate", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "validation gate failed" in err and "quarantined" in err
    assert not out.exists()
    assert (tmp_path / "validated.rejected" / "report.html").is_file()


def test_failed_rerun_keeps_the_previous_output(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{**GOOD, "id": str(i), "prompt": GOOD["prompt"] + f" ({i})"}
                                            for i in range(20)])
    out = tmp_path / "validated"
    assert main(["validate", str(good), "--out", str(out)]) == 0
    before = (out / "clean.jsonl").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n", encoding="utf-8")
    assert main(["validate", str(bad), "--out", str(out)]) == 1
    assert (out / "clean.jsonl").read_bytes() == before
    assert (out / "manifest.json").is_file()


def _good_file(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "good.jsonl", [{**GOOD, "id": str(i), "prompt": GOOD["prompt"] + f" ({i})"}
                                            for i in range(20)])


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    src, out = _good_file(tmp_path), tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["validate", str(src), "--out", str(out)]) == 1
    assert "not a folder" in capsys.readouterr().err and out.read_text() == "mine"


def test_out_that_holds_the_input_is_refused(tmp_path, capsys):
    src = _good_file(tmp_path)
    assert main(["split", str(src), "--out", str(tmp_path)]) == 1
    assert "would replace the input" in capsys.readouterr().err and src.is_file()


def test_out_that_is_someone_elses_folder_is_refused(tmp_path, capsys):
    src, out = _good_file(tmp_path), tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"\xff")
    assert main(["validate", str(src), "--out", str(out)]) == 1
    assert "no manifest.json" in capsys.readouterr().err and (out / "cat.jpg").is_file()


def test_generate_into_a_folder_is_refused(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_an_earlier_output_is_replaced_and_its_hidden_files_kept(tmp_path):
    src, out = _good_file(tmp_path), tmp_path / "validated"
    assert main(["validate", str(src), "--out", str(out)]) == 0
    (out / ".gitignore").write_text("/clean.jsonl\n")  # what DVC leaves in an output's folder
    assert main(["validate", str(src), "--out", str(out)]) == 0
    assert (out / ".gitignore").read_text() == "/clean.jsonl\n"
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


@settings(max_examples=100, deadline=None)
@given(mantissa=st.floats(1e-3, 1e3, allow_nan=False), exponent=st.integers(-9, 9))
def test_exponent_numbers_in_set_are_numbers(mantissa, exponent):
    """YAML 1.1 reads "1e-3" as text; `--set train.lr=1e-3` means the number."""
    from pipelines.cli import _overrides

    for text in (f"{mantissa:g}e{exponent}", f"{int(mantissa)}E+{abs(exponent)}"):
        value = _overrides([f"train.lr={text}"])["train"]["lr"]
        assert isinstance(value, float) and value == float(text)
    assert _overrides(["tokenizer.kind=e5"])["tokenizer"]["kind"] == "e5"  # text stays text


def _one_line(err: str, limit: int = 800) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= limit and "Traceback" not in err, err[:2000]
    return lines[0]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.sampled_from(["filter.folds", "train.lr", "generate", "a..b", "", ".x", "model.n_layer",
                                      "serve.export.name", "x" * 100]), st.text(max_size=20)),
       value=st.one_of(st.text(max_size=60), st.sampled_from(
           ["[1,", "{a: 1", "*x", "&a 1", "!!python/object:os.system x", "1" * 5000, "x" * 5000, "[[[[[[1]]]]]]",
            "{a: 1, a: 2}", "\t", "'", "1e400", "-.inf", "0x1F", "null", "[" * 100])))
def test_any_set_value_is_applied_or_refused_in_one_line_with_status_2(capsys, key, value):
    try:
        code = main(["params", "--set", f"{key}={value}"])
    except SystemExit as stop:  # argparse: a value that looks like an option (-x)
        code = stop.code
    out = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:
        assert _one_line(out.err).startswith(("distillery: parameter error: ", "distillery params: parameter error: "))


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, fragment", [
    (BOMB, "line 2: YAML aliases (*name) are not accepted"),  # 9^9 entries once expanded
    ("filter:\n  folds: 3\nfilter:\n  folds: 4\n", "line 3: key 'filter' appears twice"),
    ("filter: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 32 levels"),
    ("serve:\n  export:\n    name: " + "n" * 100_000 + "\n", "a value of 100,000 characters; at most 4,096"),
    ("filter: {folds: [" + ", ".join(["1"] * 20_000) + "]}\n", "20,000 entries; at most 10,000"),
    ("filter:\n  folds: 'x" + "y" * 3000 + "'\n", "expected an integer, got 'xyyyy"),
    ("x" * (2 << 20), "parameters are at most 1,048,576"),
    ("filter: {folds: 3\n", "not valid YAML: line 2, column 1"),
    ("evil: !!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
])
def test_params_files_are_read_within_bounds(tmp_path, capsys, text, fragment):
    params = tmp_path / "params.yaml"
    params.write_text(text, encoding="utf-8")
    out = tmp_path / "raw.jsonl"
    assert main(["data", "generate", "--out", str(out), "--params", str(params)]) == 2
    line = _one_line(capsys.readouterr().err, limit=400)
    assert str(params) in line and fragment in line, line
    assert not out.exists()


def test_params_that_are_not_utf8_are_refused(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"filter:\n  folds: \xff\n")
    assert main(["params", "--params", str(params)]) == 2
    assert "cannot read parameters" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["file/sub/out", "/dev/null/out", ""])
def test_an_out_that_cannot_be_made_is_refused_before_any_work_with_status_2(tmp_path, capsys, where):
    (tmp_path / "file").write_text("mine")
    src = _good_file(tmp_path)
    out = str(tmp_path / where) if where.startswith("file") else where
    assert main(["validate", str(src), "--out", out]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("distillery: parameter error: --out") and ("not a folder" in line or "empty" in line)
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "good.jsonl"]


def test_generated_rows_are_bounded(tmp_path, capsys):
    out = tmp_path / "raw.jsonl"
    assert main(["data", "generate", "--out", str(out), "--rows", "1000000000"]) == 2
    assert "generate.rows: 1000000000 is outside 1..5,000,000" in _one_line(capsys.readouterr().err)
    assert main(["data", "generate", "--out", str(out), "--rows", "30000", "--set", "generate.max_number=3",
                 "--set", "generate.max_ops=1", "--set", "generate.noise=0"]) == 2
    assert "distinct problems" in _one_line(capsys.readouterr().err) and not out.exists()


@pytest.mark.parametrize("argv", [["params", "--set"], ["train"], ["validate"], ["nope"], ["params", "--bogus"]])
def test_usage_errors_are_one_line_with_status_2(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("distillery") and "parameter error: " in line and "--help" in line
