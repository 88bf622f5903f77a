"""The registry's commands through `distillery`: params.yaml's `registry` section, exit statuses
0 / 1 / 2, one-line errors that name the key or file, and the console entry point as a real process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml
from registry_helpers import METRICS, make_model, snapshot

from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[2]


def params(tmp_path: Path, **gate) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "preset": "tiny",
        "registry": {"root": str(tmp_path / "reg"), "name": "lm",
                     "gate": {"metric": "accuracy", "min_gain": 0.0, "max_regression": {"format_rate": 0.01}, **gate}},
        "presets": {"tiny": {"registry": {"gate": {"minimums": {"accuracy": 0.3}}}}},
    }))
    return path


def distillery_argv(argv: tuple[str, ...]) -> list[str]:
    """("--params", P, "promote", "v1", ...) -> ["promote", "v1", ..., "--params", P, "--actor", ...]."""
    assert argv[0] == "--params"
    params_file, command, rest = argv[1], argv[2], list(argv[3:])
    head = [command] if command in ("promote", "rollback") else ["registry", command]
    return [*head, *rest, "--params", params_file, "--actor", "CI <ci@example.com>"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(distillery_argv(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_promote_and_rollback_through_the_commands(tmp_path, capsys):
    p = str(params(tmp_path))
    assert run(capsys, "--params", p, "init")[0] == 0
    m1 = make_model(tmp_path / "m1", 1)
    code, out, _ = run(capsys, "--params", p, "register", str(m1))
    assert code == 0 and "lm@v0.0.1 registered" in out
    assert "unchanged" in run(capsys, "--params", p, "register", str(m1))[1]
    assert run(capsys, "--params", p, "promote", "v0.0.1", "--to", "staging")[0] == 0
    code, out, _ = run(capsys, "--params", p, "promote", "v0.0.1", "--to", "production")
    assert code == 0 and "production: promoted v0.0.1" in out and "ok   accuracy: candidate 0.41" in out
    assert "production: unchanged v0.0.1" in run(capsys, "--params", p, "promote", "v0.0.1", "--to", "production")[1]
    assert run(capsys, "--params", p, "current")[1].strip() == "v0.0.1"
    assert run(capsys, "--params", p, "path")[1].strip() == str((tmp_path / "reg" / "models" / "lm" / "v0.0.1").resolve())

    m2 = make_model(tmp_path / "m2", 2, dict(METRICS, accuracy=0.35))
    assert run(capsys, "--params", p, "register", str(m2))[0] == 0
    before = snapshot(tmp_path / "reg")
    code, _, err = run(capsys, "--params", p, "promote", "v0.0.2", "--to", "staging")
    assert code == 1 and "FAIL accuracy: candidate 0.35, production 0.41" in err
    assert snapshot(tmp_path / "reg") == before

    m3 = make_model(tmp_path / "m3", 3, dict(METRICS, accuracy=0.5))
    run(capsys, "--params", p, "register", str(m3))
    run(capsys, "--params", p, "promote", "v0.0.3", "--to", "staging")
    run(capsys, "--params", p, "promote", "v0.0.3", "--to", "production")
    code, out, _ = run(capsys, "--params", p, "rollback", "--note", "p95 spike")
    assert code == 0 and "rolled back from v0.0.3 to v0.0.1" in out
    shown = json.loads(run(capsys, "--params", p, "show")[1])
    assert shown == {"versions": ["v0.0.1", "v0.0.2", "v0.0.3"], "stages": {"staging": "v0.0.3", "production": "v0.0.1"},
                     "stage_history": {"staging": ["v0.0.1", "v0.0.3"], "production": ["v0.0.1"]}}
    code, _, err = run(capsys, "--params", p, "rollback")
    assert code == 1 and "no previous version" in err


def test_preset_thresholds_apply(tmp_path, capsys):
    p = str(params(tmp_path))
    run(capsys, "--params", p, "init")
    run(capsys, "--params", p, "register", str(make_model(tmp_path / "m", 1, dict(METRICS, accuracy=0.2))))
    code, _, err = run(capsys, "--params", p, "promote", "v0.0.1")
    assert code == 1 and "FAIL accuracy: candidate 0.2, production -; rule >= 0.3" in err


def test_bad_parameters_exit_2_naming_the_key(tmp_path, capsys):
    p = str(params(tmp_path, min_gian=0.1))
    code, _, err = run(capsys, "--params", p, "init")
    assert code == 2 and "params.yaml: registry.gate.min_gian: unknown key; did you mean 'min_gain'?" in err
    assert not (tmp_path / "reg").exists()


def test_traversal_archive_exits_1_with_nothing_written(tmp_path, capsys):
    p = str(params(tmp_path))
    run(capsys, "--params", p, "init")
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(make_model(tmp_path / "m", 1), arcname="model")
        evil = tarfile.TarInfo("../evil")
        evil.size = 2
        tf.addfile(evil, io.BytesIO(b"{}"))
    before = snapshot(tmp_path / "reg")
    code, _, err = run(capsys, "--params", p, "register", str(archive))
    assert code == 1 and "member '../evil': a '..' path (path traversal)" in err
    assert snapshot(tmp_path / "reg") == before and not (tmp_path / "evil").exists()


def test_console_entry_point(tmp_path):
    p = str(params(tmp_path))
    cmd = [sys.executable, "-m", "pipelines.cli"]
    assert subprocess.run([*cmd, *distillery_argv(("--params", p, "init"))], cwd=ROOT,
                          capture_output=True).returncode == 0
    proc = subprocess.run([*cmd, *distillery_argv(("--params", p, "current", "--stage", "staging"))], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "lm staging holds no version" in proc.stderr


def test_release_gates_the_candidate_and_refuses_bad_evidence_writing_nothing(tmp_path, capsys):
    """`distillery release`: the pipeline's last step, with the quantize metrics beside the model."""
    p = str(params(tmp_path))
    work = tmp_path / "quantize"
    model = make_model(work / "model", 1)
    quantize = {"int8_accuracy": 0.41, "int8_format": 0.99, "int8_perplexity": 1.2, "int8_bytes": 4000}
    (work / "metrics.json").write_text(json.dumps(quantize))
    check = tmp_path / "check.json"
    check.write_text(json.dumps({"passed": True}))
    load = tmp_path / "loadtest.json"
    load.write_text(json.dumps([{"model": "generate", "batching": True, "concurrency": 1, "p50_ms": 9.0,
                                 "p95_ms": 11.0}]))

    def release(*extra: str) -> tuple[int, str, str]:
        code = main(["release", "--model", str(model), "--check", str(check), "--out", str(tmp_path / "rel"),
                     "--params", p, "--actor", "CI <ci@example.com>", *extra])
        out = capsys.readouterr()
        return code, out.out, out.err

    # bad evidence: one line, exit 1, no registry made, no report written
    code, _, err = release("--loadtest", str(tmp_path / "absent.json"))
    assert code == 1 and "absent.json" in err and "Traceback" not in err
    load_bad = tmp_path / "bad.json"
    load_bad.write_text("{not json")
    code, _, err = release("--loadtest", str(load_bad))
    assert code == 1 and "bad.json" in err
    assert not (tmp_path / "reg").exists() and not (tmp_path / "rel").exists()

    code, out, _ = release("--loadtest", str(load))
    assert code == 0 and "promoted to staging" in out
    promotion = json.loads((tmp_path / "rel" / "promotion.json").read_text())
    assert promotion["staging"] == "v0.0.1" and promotion["metrics"] == {
        "accuracy": 0.41, "format_rate": 0.99, "perplexity": 1.2, "size_bytes": 4000.0, "p50_ms": 9.0, "p95_ms": 11.0}

    # a worse candidate is registered with its evidence but never promoted; the step still succeeds
    assert run(capsys, "--params", p, "promote", "v0.0.1", "--to", "production")[0] == 0
    model2 = make_model(work / "model2", 2)
    (work / "metrics.json").write_text(json.dumps({**quantize, "int8_accuracy": 0.30}))
    code = main(["release", "--model", str(model2), "--check", str(check), "--out", str(tmp_path / "rel2"),
                 "--params", p, "--actor", "CI <ci@example.com>"])
    out = capsys.readouterr().out
    assert code == 0 and "NOT promoted" in out and "FAIL accuracy: candidate 0.3, production 0.41" in out
    shown = json.loads(run(capsys, "--params", p, "show")[1])
    assert shown["versions"] == ["v0.0.1", "v0.0.2"] and shown["stages"] == {"staging": "v0.0.1",
                                                                           "production": "v0.0.1"}


def test_serve_stage_needs_an_existing_registry_and_makes_none(tmp_path, capsys):
    p = str(params(tmp_path))
    code = main(["serve", "--repository", str(tmp_path / "triton"), "--stage", "production", "--params", p, "--once"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and str(tmp_path / "reg") in err
    assert not (tmp_path / "reg").exists() and not (tmp_path / "triton").exists()
    run(capsys, "--params", p, "init")
    code = main(["serve", "--repository", str(tmp_path / "triton"), "--stage", "production", "--params", p, "--once"])
    assert code == 1 and "holds no lm version in production" in capsys.readouterr().err
