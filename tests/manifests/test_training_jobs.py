"""pipelines/jobs.py: the PyTorchJob / TrainJob rendered from params.yaml.

    .venv/bin/python -m pytest -q tests/manifests/test_training_jobs.py

Both kinds validate against the CRD schemas in manifests/crds/; replicas, processes per node,
GPU limits, node selector, tolerations, volumes and the command follow the config; a topology
that does not split into pipeline x tensor parallel groups is a ConfigError naming the fields;
the job's parameters ConfigMap loads back into the same parameters; the committed
manifests/base/training-job.yaml is exactly the render of the repository's params.yaml.
"""

from __future__ import annotations

import os

import pytest
import yaml

from components.config import ConfigError
from k8s_schemas import MANIFESTS, load_yaml_docs, validate_object
from pipelines import jobs
from pipelines.params import REPO_PARAMS, load_params

DEFAULT_IMAGE = "ghcr.io/distillery/distillery:0.1.0"
"""components/image.py's default (what the committed file is rendered with, whatever $DISTILLERY_IMAGE says)."""


def params_for(**cluster):
    params, _ = load_params(preset="base", overrides={"cluster": cluster} if cluster else None)
    return params


def _pod_specs(job):
    if job["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]
    return [o["spec"] for o in job["spec"]["podTemplateOverrides"]]


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 3), (0, 2)])
def test_job_validates_and_follows_the_config(kind, gpus, nodes, monkeypatch):
    from components import image as image_module

    monkeypatch.setattr(image_module, "IMAGE", DEFAULT_IMAGE)
    params = params_for(job_kind=kind, gpus_per_node=gpus, nodes=nodes, cpu="6", memory="48Gi",
                        node_selector={"pool": "train"}, tolerations=[{"key": "dedicated", "operator": "Equal",
                                                                       "value": "ml", "effect": "NoSchedule"}])
    docs = jobs.render_manifests(params)
    for doc in docs:
        assert validate_object(doc) == [], doc["kind"]
    configmap, job = docs
    assert job["kind"] == kind and job["metadata"]["namespace"] == params.cluster.namespace
    nproc = max(gpus, 1)
    if kind == "PyTorchJob":
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1
        assert replicas.get("Worker", {}).get("replicas", 0) == nodes - 1
        assert ("Worker" in replicas) == (nodes > 1)
        assert job["spec"]["nprocPerNode"] == str(nproc)
        assert job["spec"]["runPolicy"]["backoffLimit"] == params.cluster.retries
        containers = [r["template"]["spec"]["containers"][0] for r in replicas.values()]
        assert {c["name"] for c in containers} == {"pytorch"}
        resources = [c["resources"] for c in containers]
        commands = [c["command"] for c in containers]
    else:
        trainer = job["spec"]["trainer"]
        assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == nproc
        assert job["spec"]["runtimeRef"]["name"] == jobs.TRAINJOB_RUNTIME
        override = job["spec"]["podTemplateOverrides"][0]
        assert override["targetJobs"] == [{"name": "node"}] and override["spec"]["containers"][0]["name"] == "node"
        resources, commands = [trainer["resourcesPerNode"]], [trainer["command"]]
    for res in resources:
        assert res["requests"] == res["limits"]
        assert res["limits"]["cpu"] == "6" and res["limits"]["memory"] == "48Gi"
        assert res["limits"].get("nvidia.com/gpu", 0) == gpus
    for cmd in commands:
        assert cmd[:3] == ["torchrun", f"--nnodes={nodes}", f"--nproc-per-node={nproc}"]
        assert cmd[3:7] == ["-m", "pipelines.cli", "train", "--stage"]
        assert cmd[cmd.index("--params") + 1] == f"{jobs.PARAMS_MOUNT}/params.yaml"
    for pod in _pod_specs(job):
        assert pod["nodeSelector"] == {"pool": "train"}
        assert pod["tolerations"][0]["key"] == "dedicated"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {params.cluster.checkpoint_pvc}
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert {params.cluster.checkpoint_mount, jobs.PARAMS_MOUNT, "/tmp", "/dev/shm"} <= mounts
        assert pod["securityContext"]["runAsUser"] == jobs.RUN_AS
        configmaps = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
        assert configmaps == [configmap["metadata"]["name"]]
    env = job["spec"]["trainer"]["env"] if kind == "TrainJob" else containers[0]["env"]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert set(secret_env) == set(params.cluster.dvc_secret_env.values())
    assert all(ref["name"] == params.cluster.dvc_secret for ref in secret_env.values())
    assert ({"name": "DS_ACCELERATOR", "value": "cpu"} in env) == (gpus == 0)
    image = job["spec"]["trainer"]["image"] if kind == "TrainJob" else containers[0]["image"]
    assert image == (DEFAULT_IMAGE.replace("distillery:", "distillery-cuda:") if gpus else DEFAULT_IMAGE)


def test_no_dvc_secret_no_secret_env():
    job = jobs.render_job(params_for(dvc_secret=""))
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert not [e for e in env if "valueFrom" in e]


def test_paths_follow_the_stage():
    params = params_for()
    mount = params.cluster.checkpoint_mount
    base = jobs.train_command(params, "base", f"{mount}/data/split", f"{mount}/base", None)
    job = jobs.render_job(params)
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"] == base
    finetune = jobs.render_job(params, "finetune")
    cmd = finetune["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[cmd.index("--init") + 1] == f"{mount}/reinforce/model"
    assert cmd[cmd.index("--out") + 1] == f"{mount}/finetune"
    assert finetune["metadata"]["name"] == "distillery-train-finetune"
    custom = jobs.render_job(params, "reinforce", data="/data/x", out="/out/y", init="/m/z", name="rl-1")
    cmd = custom["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert [cmd[cmd.index(f) + 1] for f in ("--data", "--out", "--init")] == ["/data/x", "/out/y", "/m/z"]
    with pytest.raises(ConfigError, match="--init"):
        jobs.render_job(params, "base", init="/m/z")
    with pytest.raises(ConfigError, match="stage"):
        jobs.render_job(params, "pretrain")


@pytest.mark.parametrize("gpus,nodes,pp,tp,ok", [(8, 1, 2, 2, True), (4, 3, 3, 1, True), (4, 3, 2, 2, True),
                                                 (4, 3, 8, 1, False), (3, 1, 2, 1, False), (0, 3, 2, 1, False)])
def test_topology_must_split_into_parallel_groups(gpus, nodes, pp, tp, ok):
    params, _ = load_params(preset="base", overrides={
        "cluster": {"gpus_per_node": gpus, "nodes": nodes},
        "train": {"pipeline_parallel": pp, "tensor_parallel": tp, "zero_stage": 1}})
    assert (params.cluster.processes % (pp * tp) == 0) == ok
    if ok:
        jobs.render_job(params)
        return
    with pytest.raises(ConfigError) as err:
        jobs.render_job(params)
    for field in ("cluster.nodes", "cluster.gpus_per_node", "train.pipeline_parallel", "train.tensor_parallel"):
        assert field in str(err.value)
    jobs.render_job(params, "finetune")  # the data-parallel stages do not split by pp x tp


def test_params_configmap_loads_back(tmp_path):
    params, _ = load_params(preset="tiny", overrides={"train": {"steps": 7}, "cluster": {"nodes": 2}})
    configmap = jobs.params_configmap(params, "x")
    path = tmp_path / "params.yaml"
    path.write_text(configmap["data"]["params.yaml"], encoding="utf-8")
    again, preset = load_params(path)
    assert again == params and preset == jobs.RESOLVED_PRESET
    assert again.train.steps == 7


def test_gpu_jobs_use_the_cuda_image(monkeypatch):
    from components import image

    monkeypatch.setattr(image, "IMAGE", "registry.example/team/distillery:1.2.3")
    assert jobs.job_image(params_for(gpus_per_node=8)) == "registry.example/team/distillery-cuda:1.2.3"
    assert jobs.job_image(params_for(gpus_per_node=0)) == "registry.example/team/distillery:1.2.3"
    monkeypatch.setattr(image, "IMAGE", "localhost:5000/distillery")
    assert jobs.job_image(params_for(gpus_per_node=1)) == "localhost:5000/distillery-cuda"
    assert jobs.job_image(params_for(image="mine:7")) == "mine:7"
    monkeypatch.setattr(image, "IMAGE", "registry.example/distillery@sha256:" + "0" * 64)
    with pytest.raises(ConfigError, match="cluster.image"):
        jobs.job_image(params_for(gpus_per_node=8))


def test_committed_base_job_is_the_render_of_params_yaml(monkeypatch):
    from components import image

    monkeypatch.setattr(image, "IMAGE", DEFAULT_IMAGE)
    params, _ = load_params(REPO_PARAMS, preset="base")
    expected = jobs.job_yaml(params, "base", suspend=True)
    committed = (MANIFESTS / "base" / "training-job.yaml").read_text(encoding="utf-8")
    assert committed == expected, ("manifests/base/training-job.yaml differs from the render of params.yaml; "
                                   "run: distillery render-job --preset base --suspend "
                                   "--out manifests/base/training-job.yaml")
    job = load_yaml_docs(MANIFESTS / "base" / "training-job.yaml")[1]
    assert job["spec"]["runPolicy"]["suspend"] is True


def test_write_job_is_atomic(tmp_path):
    path = tmp_path / "jobs" / "job.yaml"
    jobs.write_job(params_for(job_kind="TrainJob"), path, "reinforce")
    docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert [d["kind"] for d in docs if d] == ["ConfigMap", "TrainJob"]
    before = path.read_bytes()
    bad, _ = load_params(preset="base", overrides={"cluster": {"gpus_per_node": 3},
                                                   "train": {"pipeline_parallel": 2, "zero_stage": 1}})
    with pytest.raises(ConfigError):
        jobs.write_job(bad, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["job.yaml"], "no temporary file left behind"
    assert "&id" not in path.read_text(encoding="utf-8"), "plain YAML, no anchors"


def test_render_job_command_line(tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "job.yaml"
    assert main(["render-job", "--params", str(REPO_PARAMS), "--preset", "tiny", "--stage", "finetune",
                      "--set", "cluster.job_kind=TrainJob", "--set", "cluster.gpus_per_node=0", "--out", str(out)]) == 0
    assert "TrainJob distillery-train-finetune" in capsys.readouterr().out
    job = load_yaml_docs(out)[1]
    assert job["spec"]["trainer"]["numProcPerNode"] == 1 and validate_object(job) == []
    assert main(["render-job", "--params", str(REPO_PARAMS), "--set", "cluster.nodes=0", "--out", str(tmp_path / "b.yaml")]) == 2
    assert "cluster.nodes" in capsys.readouterr().err
    assert not (tmp_path / "b.yaml").exists()
