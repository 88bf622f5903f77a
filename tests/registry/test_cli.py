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
