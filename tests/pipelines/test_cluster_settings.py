"""The `cluster` section as kfp-kubernetes settings: compile, read the YAML back, check each task.

The compiled package has two YAML documents: the pipeline spec (tasks, retry policies, caching,
executors with their resources and env) and the platform spec
(`platforms.kubernetes.deploymentSpec.executors.<executor>`: pvcMount, secretAsEnv,
nodeSelector, tolerations), which the tests also parse into kfp-kubernetes' own protobuf.

    .venv/bin/python -m pytest -q tests/pipelines/test_cluster_settings.py   # about 20 s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.cli import main
from pipelines.params import REPO_PARAMS, load_params
from pipelines.pipeline import CHECKPOINT_ENV, compile_pipeline

TRAINING = ("train-base", "train-reinforce", "train-finetune", "distill")
ALL_TASKS = {"ingest", "validate", "filter-rows", "split", "train-base", "train-reinforce", "train-finetune",
             "evaluate-stages", "distill", "quantize", "serve-export", "serve-check", "promote"}


class Compiled:
    """The two documents of a compiled package, looked up by task name."""

    def __init__(self, path):
        docs = list(yaml.safe_load_all(path.read_text()))
        self.spec = docs[0]
        self.platform = docs[1] if len(docs) > 1 else {}
        self.tasks = self.spec["root"]["dag"]["tasks"]

    def executor_label(self, task: str) -> str:
        component = self.tasks[task]["componentRef"]["name"]
        return self.spec["components"][component]["executorLabel"]

    def container(self, task: str) -> dict:
        return self.spec["deploymentSpec"]["executors"][self.executor_label(task)]["container"]

    def k8s(self, task: str) -> dict:
        executors = self.platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
        return executors.get("executors", {}).get(self.executor_label(task), {})


def _compile(tmp_path, *sets: str, name: str = "pipeline.yaml", flags: tuple[str, ...] = ()) -> Compiled:
    out = tmp_path / name
    args = ["compile", "--preset", "tiny", "--out", str(out), *flags]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return Compiled(out)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("default"))


def test_gpus_on_training_executors_only(default):
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    assert set(default.tasks) == ALL_TASKS
    for task in ALL_TASKS:
        resources = default.container(task).get("resources", {})
        accel = resources.get("accelerator")
        if task in TRAINING:  # train-base starts one process per GPU; the other stages run one
            assert accel["resourceType"] == tiny.cluster.gpu_type == "nvidia.com/gpu"
            assert accel["resourceCount"] == str(tiny.cluster.gpus_per_node if task == "train-base" else 1)
            assert resources["resourceCpuRequest"] == resources["resourceCpuLimit"] == tiny.cluster.cpu
            assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == tiny.cluster.memory
        elif task == "evaluate-stages":  # one inference process: one accelerator
            assert accel["resourceCount"] == "1"
        else:
            assert accel is None, f"{task} asks for an accelerator"


def test_gpu_tasks_run_the_cuda_image_the_others_the_cpu_one(default):
    from components.image import IMAGE

    for task in ALL_TASKS:
        gpus = "accelerator" in default.container(task).get("resources", {})
        repo, _, tag = IMAGE.rpartition(":")
        assert default.container(task)["image"] == (f"{repo}-cuda:{tag}" if gpus else IMAGE), task


def test_volumes_secret_node_selector_tolerations(default):
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    cluster = tiny.cluster
    for task in ALL_TASKS:
        k8s = default.k8s(task)
        mounts = {(m["pvcNameParameter"]["runtimeValue"]["constant"], m["mountPath"]) for m in k8s.get("pvcMount", [])}
        env = {e["name"]: e["value"] for e in default.container(task).get("env", [])}
        if task in TRAINING:
            assert mounts == {(cluster.checkpoint_pvc, cluster.checkpoint_mount)}
            assert env[CHECKPOINT_ENV] == cluster.checkpoint_mount  # the step trains on the volume
        elif task == "promote":
            assert mounts == {(cluster.registry_pvc, cluster.registry_mount)}
        else:
            assert not mounts and CHECKPOINT_ENV not in env, task
        if task in (*TRAINING, "evaluate-stages"):
            assert k8s["nodeSelector"]["labels"] == cluster.node_selector
            assert k8s["tolerations"] == cluster.tolerations
        else:
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, task
        if task == "ingest":
            (secret,) = k8s["secretAsEnv"]
            assert secret["secretNameParameter"]["runtimeValue"]["constant"] == cluster.dvc_secret
            assert {m["secretKey"]: m["envVar"] for m in secret["keyToEnv"]} == cluster.dvc_secret_env
            assert secret["optional"] is True  # a cluster without the Secret still ingests a mounted path
        elif task == "train-base":  # HF_TOKEN for an hf:// base model, optional (public models need none)
            (secret,) = k8s["secretAsEnv"]
            assert secret["secretNameParameter"]["runtimeValue"]["constant"] == cluster.hf_secret
            assert {m["secretKey"]: m["envVar"] for m in secret["keyToEnv"]} == {"token": "HF_TOKEN"}
            assert secret["optional"] is True
        else:
            assert "secretAsEnv" not in k8s, task
    # no credential value anywhere in the YAML: only the Secret's name and keys
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(default.spec)


def test_platform_spec_parses_as_kfp_kubernetes_protobuf(default):
    platform = json_format.ParseDict(default.platform, pipeline_spec_pb2.PlatformSpec())
    executors = platform.platforms["kubernetes"].deployment_spec.executors
    assert set(executors) == {default.executor_label(t) for t in (*TRAINING, "evaluate-stages", "ingest", "promote")}
    config = json_format.ParseDict(json_format.MessageToDict(executors[default.executor_label("train-base")]),
                                   k8s_pb.KubernetesExecutorConfig())
    assert config.pvc_mount[0].mount_path == "/mnt/checkpoints"
    assert config.tolerations[0].operator == "Exists"


def test_retries_and_caching(default):
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    for task in ALL_TASKS:
        retry = default.tasks[task].get("retryPolicy")
        if task in ("ingest", "serve-check", *TRAINING, "evaluate-stages"):
            assert retry["maxRetryCount"] == tiny.cluster.retries and retry["backoffFactor"] == 2
        else:
            assert retry is None, f"{task} retries"
    # a long window on training: Argo counts it from the first attempt's start
    assert int(default.tasks["train-base"]["retryPolicy"]["backoffMaxDuration"].rstrip("s")) >= 86400
    for task in ("promote", "serve-check", "ingest"):
        assert not default.tasks[task]["cachingOptions"].get("enableCache"), task
    assert all(default.tasks[t]["cachingOptions"]["enableCache"] for t in ("validate", "split", *TRAINING))


def _promote_config(compiled: Compiled) -> dict:
    """promote's compile-time constant: every preset's registry section."""
    return compiled.tasks["promote"]["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]


def test_cluster_is_not_a_run_parameter_and_registry_moves_onto_its_volume(default):
    inputs = default.spec["root"]["inputDefinitions"]["parameters"]
    assert not [name for name in inputs if "cluster" in name]
    assert "gpus_per_node" not in json.dumps(inputs)
    assert "cluster" not in json.dumps(default.spec["root"]["dag"]["tasks"])  # nor a step's constant
    roots = {name: sections["registry"]["root"] for name, sections in _promote_config(default).items()}
    assert len(roots) > 1 and set(roots.values()) == {"/mnt/registry/registry"}  # every preset's


def test_cpu_flag_asks_for_no_gpu_node_selector_or_toleration(tmp_path, capsys):
    """`distillery compile --cpu`: a CPU-only cluster; the line after writing says what is asked."""
    from components.image import IMAGE

    _compile(tmp_path, name="gpu.yaml")
    asks = capsys.readouterr().out.splitlines()[-1]
    assert asks.startswith("compile: the pipeline asks the cluster for 8 nvidia.com/gpu on train-base and 1 on ")
    assert "Secret distillery-dvc-remote on ingest (optional)" in asks
    assert "PVCs distillery-checkpoints, distillery-registry" in asks
    cpu = _compile(tmp_path, name="cpu.yaml", flags=("--cpu",))
    asks = capsys.readouterr().out.splitlines()[-1]
    assert "no GPUs" in asks and "nvidia.com/gpu" not in asks and "(optional)" in asks
    for task in ALL_TASKS:
        assert "accelerator" not in cpu.container(task).get("resources", {}), task
        assert "nodeSelector" not in cpu.k8s(task) and "tolerations" not in cpu.k8s(task), task
        assert cpu.container(task)["image"] == IMAGE, task
    assert "accelerator" not in json.dumps(cpu.spec) and "nvidia" not in json.dumps(cpu.platform)
    assert cpu.k8s("train-base")["pvcMount"] and cpu.k8s("ingest")["secretAsEnv"]  # the rest stays


def test_settings_follow_the_config(tmp_path):
    two = _compile(tmp_path, "cluster.gpus_per_node=2", "cluster.gpu_type=amd.com/gpu", "cluster.retries=5",
                   "cluster.node_selector={pool: a100}", "cluster.checkpoint_pvc=ckpt",
                   "cluster.checkpoint_mount=/ckpt", "cluster.dvc_secret_env={key: DVC_KEY}",
                   "cluster.image=registry.example.com/distillery:1.2", name="two.yaml")
    for task in TRAINING:
        accel = two.container(task)["resources"]["accelerator"]
        assert (accel["resourceType"], accel["resourceCount"]) == ("amd.com/gpu", "2" if task == "train-base" else "1")
        assert two.k8s(task)["nodeSelector"]["labels"] == {"pool": "a100"}
        assert two.k8s(task)["pvcMount"][0]["mountPath"] == "/ckpt"
        assert two.tasks[task]["retryPolicy"]["maxRetryCount"] == 5
    assert two.k8s("ingest")["secretAsEnv"][0]["keyToEnv"] == [{"secretKey": "key", "envVar": "DVC_KEY"}]
    assert {e["container"]["image"] for e in two.spec["deploymentSpec"]["executors"].values()} == {
        "registry.example.com/distillery:1.2"}

    cpu = _compile(tmp_path, "cluster.gpus_per_node=0", "cluster.retries=0", "cluster.dvc_secret=''", "cluster.hf_secret=''",
                   "cluster.tolerations=[]", "cluster.node_selector={}", name="cpu.yaml")
    for task in ALL_TASKS:
        assert "accelerator" not in cpu.container(task).get("resources", {}), task
        assert "retryPolicy" not in cpu.tasks[task], task
        assert "secretAsEnv" not in cpu.k8s(task) and "tolerations" not in cpu.k8s(task)
    assert cpu.container("train-base")["resources"]["resourceCpuLimit"] == "8"  # cpu/memory stay


def test_local_builds_carry_no_cluster_settings(tmp_path):
    """kfp.local honours retries: `distillery run` builds the DAG without any of it."""
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    out = tmp_path / "local.yaml"
    compile_pipeline(str(out), REPO_PARAMS, "tiny", on_cluster=False)
    local = Compiled(out)
    assert not local.platform
    assert all("retryPolicy" not in t for t in local.tasks.values())
    assert all("resources" not in local.container(t) and "env" not in local.container(t) for t in ALL_TASKS)
    assert _promote_config(local)["tiny"]["registry"]["root"] == tiny.registry.root
    assert not local.tasks["promote"]["cachingOptions"].get("enableCache")


@pytest.mark.parametrize("setting, fragment", [
    ("cluster.tolerations=[{key: a, operator: Maybe}]", "cluster.tolerations[0].operator: 'Maybe'"),
    ("cluster.tolerations=[{key: a, effect: NoSchedule, seconds: '3'}]", "cluster.tolerations[0]: unknown key"),
    ("cluster.cpu=eight", "cluster.cpu: 'eight'"),
    ("cluster.memory=64 GB", "cluster.memory: '64 GB'"),
    ("registry.root=/srv/registry", "registry.root: /srv/registry is not under cluster.registry_mount"),
    ("cluster.gpus_per_node=-1", "gpus_per_node"),
    ("cluster.gpu_type=''", "cluster.gpu_type: empty, with gpus_per_node 8"),
])
def test_bad_cluster_settings_are_parameter_errors(tmp_path, capsys, setting, fragment):
    out = tmp_path / "bad.yaml"
    assert main(["compile", "--preset", "tiny", "--out", str(out), "--set", setting]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


CHECKPOINT_RUN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from kfp import dsl
    from components.config import from_dict
    from components.data import generate, split
    from components.data.config import GenerateConfig, SplitConfig
    from components.kfp_io import training_key
    from components.train import base
    from components.train import component as training
    from pipelines.params import load_params

    root, volume = Path(sys.argv[1]), Path(sys.argv[2])
    params, _ = load_params(None, "tiny")
    generate.run(from_dict(GenerateConfig, {"rows": 300, "noise": 0.0}), root / "raw" / "rows.jsonl")
    split.run(root / "raw" / "rows.jsonl", params.split, root / "split")
    model = dsl.Model(uri=str(root / "artifact" / "model"))
    metrics, curve = dsl.Metrics(uri=str(root / "artifact" / "metrics")), dsl.HTML(uri=str(root / "artifact" / "curve"))
    # a first attempt that trained to its last checkpoint on the volume, then lost its pod
    splits = dsl.Dataset(uri=str(root / "split"))
    work = volume / training_key("train-base", splits, params.tokenizer, params.model, params.train)
    base.run(params.model, params.train, params.tokenizer, work, data_dir=root / "split", progress=False)
    first = (work / "model" / "model.safetensors").read_bytes()
    first_log = (work / "metrics.jsonl").read_text()  # tokens/s per step: a retrain would not repeat it
    # the retry: same task, same output URI, the component with the volume in its environment
    p = params.as_dict()
    training.train_base.python_func(splits=splits, preset="tiny", config={"tiny": {s: p[s] for s in
        ("tokenizer", "model", "train")}, "small": {}}, model=model, metrics=metrics, loss_curve=curve)
    out = Path(model.path)
    print(json.dumps({"same_model": (out / "model" / "model.safetensors").read_bytes() == first,
                      "same_log": (out / "metrics.jsonl").read_text() == first_log,
                      "loss_lines": sum(1 for _ in open(out / "metrics.jsonl")),
                      "volume_left": sorted(p.name for p in volume.iterdir())}))
""")


def test_a_retried_training_step_resumes_from_the_checkpoint_volume(tmp_path):
    """The component half of the checkpoint PVC: with $DISTILLERY_CHECKPOINT_DIR set, train_base
    works in a folder on the volume keyed by its inputs (kfp_io.training_key: the split's URI and
    the configs the run resolved from its preset), so a retry finds the earlier attempt's
    checkpoints (here: all of them, so it trains no further: its metrics.jsonl, with the first
    attempt's tokens/s, comes back byte for byte), and leaves the volume clean."""
    volume = tmp_path / "volume"
    volume.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", CHECKPOINT_ENV: str(volume),
           "PYTHONPATH": str(REPO_PARAMS.parent)}
    proc = subprocess.run([sys.executable, "-c", CHECKPOINT_RUN, str(tmp_path), str(volume)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO_PARAMS.parent)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    assert result == {"same_model": True, "same_log": True, "loss_lines": tiny.train.steps, "volume_left": []}


def test_render_job_command_passes_its_arguments_to_pipelines_jobs(tmp_path, capsys):
    """The `distillery render-job` wiring only; pipelines/jobs.py's own tests check the job itself."""
    out = tmp_path / "job.yaml"
    assert main(["render-job", "--preset", "tiny", "--stage", "finetune", "--data", "/mnt/checkpoints/gsm8k",
                 "--job-out", "/mnt/checkpoints/ft2", "--name", "ft-two", "--suspend", "--set",
                 "cluster.job_kind=TrainJob", "--out", str(out)]) == 0
    config_map, job = list(yaml.safe_load_all(out.read_text()))
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "TrainJob"
    assert job["metadata"]["name"] == "ft-two" and job["spec"]["suspend"] is True
    command = " ".join(job["spec"]["trainer"]["command"])
    assert "--stage finetune" in command and "--data /mnt/checkpoints/gsm8k" in command
    assert "--out /mnt/checkpoints/ft2" in command
    assert f"to {out}" in capsys.readouterr().out
    assert main(["render-job", "--preset", "tiny", "--init", "/x", "--out", str(tmp_path / "no.yaml")]) == 2
    assert "--init" in capsys.readouterr().err and not (tmp_path / "no.yaml").exists()
