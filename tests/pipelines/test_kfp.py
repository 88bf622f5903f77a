"""The Kubeflow pipeline: compiled IR YAML loads back with kfp, its run form is flat, typed and
described; the whole DAG runs with kfp.local, with a run-form value as the UI would pass it."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines.cli import main
from pipelines.local import PipelineFailed, run_local
from pipelines.params import REPO_PARAMS, load_params, preset_names
from pipelines.pipeline import LOCAL_PRESET

RUN_FORM = {"preset": ("STRING", "String"), "source_uri": ("STRING", "String"), "source_fields": ("STRUCT", "Dict"),
            "generate_rows": ("NUMBER_INTEGER", "Integer"), "base_model": ("STRING", "String"),
            **{f"{stage}_{what}": ("NUMBER_INTEGER", "Integer") if what == "steps" else ("NUMBER_DOUBLE", "Float")
               for stage in ("train", "reinforce", "finetune", "distill") for what in ("steps", "lr")},
            "gate_metric": ("STRING", "String"), "gate_min_gain": ("NUMBER_DOUBLE", "Float"),
            "gate_minimums": ("STRUCT", "Dict")}
"""The run form: parameter -> (its IR type, the type kfp's loader gives it)."""
FORM_TRAIN_STEPS = 20
"""train_steps in the local run's form: not the tiny preset's 30, so the step shows it got there."""


def test_compiled_pipeline_loads_back_with_kfp(tmp_path):
    from kfp import components

    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--preset", "tiny", "--out", str(out)]) == 0
    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "distillery"
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"ingest", "validate", "filter-rows", "split", "train-base", "train-reinforce",
                          "train-finetune", "evaluate-stages", "distill", "quantize", "serve-export", "serve-check",
                          "promote"}
    assert set(tasks["quantize"]["dependentTasks"]) == {"distill", "split"}
    assert tasks["train-finetune"]["dependentTasks"] == ["split", "train-reinforce"] or \
        set(tasks["train-finetune"]["dependentTasks"]) == {"split", "train-reinforce"}
    # the compiled preset is the run form's default
    assert spec["root"]["inputDefinitions"]["parameters"]["preset"]["defaultValue"] == "tiny"
    # ingest reads a path whose content the cache key cannot see: never cached; the rest are
    assert not tasks["ingest"]["cachingOptions"].get("enableCache")
    assert all(tasks[t]["cachingOptions"]["enableCache"] for t in ("validate", "filter-rows", "split"))
    # every component runs the suite's image without installing anything at run time
    for executor in spec["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"].startswith("ghcr.io/distillery/distillery")
        assert "pip install" not in " ".join(container["command"])


def test_run_form_is_flat_typed_and_described(tmp_path):
    """What the Kubeflow UI's run form shows: the flat parameters, typed, each with a description
    (from the pipeline function's docstring), the numbers' descriptions listing every preset's
    value; every preset's step settings are compiled into the components as constants."""
    from kfp import components

    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--preset", "tiny", "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    form = spec["root"]["inputDefinitions"]["parameters"]
    assert set(form) == set(RUN_FORM)
    loaded = components.load_component_from_file(str(out)).component_spec.inputs
    for name, (ir_type, kfp_type) in RUN_FORM.items():
        assert form[name]["parameterType"] == ir_type and loaded[name].type == kfp_type, name
        assert form[name]["description"].strip(), f"{name} has no description"
    names = preset_names(REPO_PARAMS)
    presets = {name: load_params(REPO_PARAMS, name)[0] for name in names}
    assert len(names) > 1 and form["preset"]["defaultValue"] == "tiny"
    assert all(name in form["preset"]["description"] for name in names)
    steps = form["train_steps"]["description"]
    assert form["train_steps"]["defaultValue"] == 0 and "0 keeps the preset's" in steps
    assert all(f"{name} {params.train.steps}" in steps for name, params in presets.items()), steps
    assert form["gate_metric"]["defaultValue"] == presets["tiny"].registry.gate.metric
    assert form["gate_minimums"]["defaultValue"] == presets["tiny"].registry.gate.minimums
    # every preset, whole, in the components' constant config; no step config is a run parameter
    tasks = spec["root"]["dag"]["tasks"]
    constant = tasks["train-base"]["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]
    assert set(constant) == set(names)
    assert {name: constant[name]["train"]["steps"] for name in names} == {n: p.train.steps for n, p in presets.items()}
    assert set(constant["base"]) == {"tokenizer", "model", "train"}  # only the sections the step needs
    assert tasks["train-base"]["inputs"]["parameters"]["train_steps"] == {"componentInputParameter": "train_steps"}
    assert all("config" in t["inputs"]["parameters"] and t["inputs"]["parameters"]["preset"] ==
               {"componentInputParameter": "preset"} for t in tasks.values())


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The tiny preset through the whole DAG with kfp.local, once, as `distillery run` runs it
    (pipelines/local.py), with one run-form value the UI could pass: train_steps."""
    out = tmp_path_factory.mktemp("run")
    params, _ = load_params(REPO_PARAMS, "tiny", {"registry": {"root": str(out / "registry")}})
    run_local(params, out, arguments={"train_steps": FORM_TRAIN_STEPS})
    return out / "latest"


def test_local_run_writes_every_artifact(local_run):
    splits = local_run / "split" / "splits"
    rows = {name: sum(1 for _ in open(splits / f"{name}.jsonl")) for name in ("train", "val", "test")}
    assert rows["train"] > rows["test"] > 0
    kept = [json.loads(line) for line in open(local_run / "filter-rows" / "kept" / "kept.jsonl")]
    assert sum(rows.values()) == len(kept)
    assert all(row["weight"] > 0 for row in kept)
    assert (local_run / "validate" / "clean" / "data_docs" / "index.html").is_file()
    assert (local_run / "validate" / "report").read_text().startswith("<!doctype html>")
    assert (local_run / "filter-rows" / "report").stat().st_size > 0
    base = local_run / "train-base" / "model"
    assert (base / "model" / "model.safetensors").is_file() and (base / "model" / "tokenizer").is_dir()
    losses = [json.loads(line)["loss"] for line in open(base / "metrics.jsonl")]
    assert len(losses) == FORM_TRAIN_STEPS and losses[-1] < losses[0]  # the run form's steps, not the preset's
    assert "data:image/png;base64," in (local_run / "train-base" / "loss_curve").read_text()
    # the chain: reinforce from base, finetune from reinforce, evaluate all three
    rl = local_run / "train-reinforce" / "model"
    assert json.loads((rl / "manifest.json").read_text())["inputs"]["init"]["path"].endswith(
        "train-base/model/model/model.safetensors")
    assert "data:image/png;base64," in (local_run / "train-reinforce" / "rewards_curve").read_text()
    assert (local_run / "train-finetune" / "model" / "model" / "model.safetensors").is_file()
    report = (local_run / "evaluate-stages" / "report").read_text()
    assert "| base |" in report and "| reinforce |" in report and "| finetune |" in report
    outputs = json.loads((local_run / "evaluate-stages" / "executor_output.json").read_text())["artifacts"]
    (logged,) = outputs["metrics"]["artifacts"]
    assert 0 <= logged["metadata"]["finetune_accuracy"] <= 1
    # compression: the student from the finetuned teacher, then its INT8 artifact
    distilled = json.loads((local_run / "distill" / "model" / "metrics.json").read_text())
    assert distilled["student_params"] < distilled["teacher_params"]
    assert json.loads((local_run / "distill" / "model" / "manifest.json").read_text())["inputs"]["teacher"][
        "path"].endswith("train-finetune/model/model/model.safetensors")
    int8 = local_run / "quantize" / "model"
    assert (int8 / "model" / "quantization.json").is_file()
    assert json.loads((int8 / "metrics.json").read_text())["size_ratio"] > 3
    # serving: the INT8 model in a Triton repository, checked on a real server, then registered
    repo = local_run / "serve-export" / "repository"
    assert (repo / "distillery_generate" / "1" / "model.py").is_file()
    assert (repo / "distillery_score" / "config.pbtxt").is_file()
    check = json.loads((local_run / "serve-check" / "check" / "check.json").read_text())
    assert check["passed"] and set(check["protocols"]) == {"http", "grpc"}
    rows = json.loads((local_run / "serve-check" / "check" / "loadtest.json").read_text())
    assert {(r["batching"], r["concurrency"]) for r in rows} == {(b, c) for b in (True, False) for c in (1, 4)}
    assert all(r["errors"] == 0 for r in rows)
    assert "promoted to staging" in (local_run / "promote" / "report").read_text()


def test_local_run_lineage_and_conservation(local_run):
    raw_manifest = json.loads((local_run / "ingest" / "raw" / "raw.manifest.json").read_text())
    val = json.loads((local_run / "validate" / "clean" / "manifest.json").read_text())
    # validate's input hash is the hash of the rows the ingest step wrote
    assert val["inputs"]["rows"]["sha256"] == raw_manifest["outputs"]["rows"]["sha256"]
    assert val["params"]["validate"]["min_rows"] == 50  # the tiny preset's value reached the step
    assert val["metrics"]["clean"] + val["metrics"]["quarantined"] == raw_manifest["metrics"]["rows"]
    assert "package" in val["code"]
    outputs = json.loads((local_run / "validate" / "executor_output.json").read_text())["artifacts"]
    (logged,) = outputs["metrics"]["artifacts"]
    assert logged["metadata"]["clean"] == val["metrics"]["clean"]  # KFP Metrics carry the step's metrics


def test_an_unknown_preset_fails_the_first_step_naming_the_known_ones(tmp_path):
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    with pytest.raises(PipelineFailed) as err:
        run_local(tiny, tmp_path / "run", arguments={"preset": "huge"})
    message = str(err.value)
    assert "step ingest failed" in message and "\n" not in message
    assert f"preset: unknown preset 'huge'; known: {LOCAL_PRESET}" in message
    assert not list((tmp_path / "run" / "kfp").glob("*/validate"))  # nothing ran after it


def test_local_run_on_a_bad_source_names_the_line_before_starting(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n', encoding="utf-8")
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--source", str(bad)]) == 1
    assert "bad.jsonl:1: missing column(s) 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_failed_gate_fails_the_run_and_still_publishes_its_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out), "--set", "validate.max_quarantine_fraction=0.01"]) == 1
    err = capsys.readouterr().err
    assert "local pipeline run failed" in err and "\x1b[" not in err
    (report,) = out.glob("kfp/*/validate/report")
    assert "FAILED" in report.read_text()
    assert not list(out.glob("kfp/*/filter-rows"))  # nothing ran after the gate


def test_gsm8k_runs_through_all_three_stages_locally(shared_data, tmp_path):
    """The real-data path: GSM8K's test set through the whole DAG with the tiny preset (quality is
    not expected at that size; every stage must run and hand its model on)."""
    out = tmp_path / "gsm8k"
    assert main(["run", "--preset", "tiny", "--out", str(out), "--source", str(shared_data / "gsm8k" / "test.jsonl"),
                 "--set", "source.fields={prompt: question, response: answer}"]) == 0
    run = out / "latest"
    rl = json.loads((run / "train-reinforce" / "model" / "manifest.json").read_text())
    assert rl["metrics"]["steps"] == 4 and 0 <= rl["metrics"]["final_format"] <= 1
    outputs = json.loads((run / "evaluate-stages" / "executor_output.json").read_text())["artifacts"]
    (logged,) = outputs["metrics"]["artifacts"]
    assert logged["metadata"]["problems"] == 20  # the tiny preset's max_rows, GSM8K rows with answers
    assert {f"{s}_accuracy" for s in ("base", "reinforce", "finetune")} <= set(logged["metadata"])
