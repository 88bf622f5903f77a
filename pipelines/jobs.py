"""The distributed training job on Kubernetes, rendered from the same params.yaml as everything else.

    distillery render-job --preset base --stage base --out job.yaml        # the CLI command
    python -m pipelines.cli render-job --preset base --stage base --out job.yaml   # the same, off PATH
    kubectl apply -f job.yaml                                              # needs the operator's CRDs

`cluster.job_kind` picks what is written:

- PyTorchJob (Kubeflow Training Operator, kubeflow.org/v1): a Master replica and `cluster.nodes - 1`
  Worker replicas, `nprocPerNode` = `cluster.gpus_per_node` (1 on CPUs). The operator sets
  PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT for torchrun.
- TrainJob (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1): `runtimeRef` to the
  `torch-distributed` ClusterTrainingRuntime, `trainer.numNodes`, `numProcPerNode`,
  `resourcesPerNode`; the pod settings this suite needs (volumes, security context, node selector,
  tolerations) go into `podTemplateOverrides` for the runtime's `node` job and container.

Both run `torchrun -m pipelines.cli train --stage S --params /etc/distillery/params.yaml --data D --out O`
(the DeepSpeed engine initialises from torchrun's environment). The parameters travel with the
job, not with the image: the file writes a ConfigMap `<job>-params` holding the *resolved*
parameters (the chosen preset and every --set already applied, under a one-entry preset
`resolved`), mounted at /etc/distillery. So the job trains exactly what was rendered, whatever
params.yaml the image was built with.

Where things are on the cluster: the checkpoint PVC (`cluster.checkpoint_pvc`) is mounted at
`cluster.checkpoint_mount`; by default the split folder is `<mount>/data/split`, the stage writes
`<mount>/<stage>` (run again to resume: a retried pod continues from its last checkpoint), and
reinforce / finetune start from the previous stage's `<mount>/<previous>/model`. The DVC remote's
credentials come from the Secret `cluster.dvc_secret` through secretKeyRef (optional: the job
starts without it); nothing secret is ever written into the YAML.

Every pod runs as Pod Security "restricted" asks: non-root uid 10001 (the Dockerfiles' USER),
no privilege escalation, all capabilities dropped, seccomp RuntimeDefault, a read-only root file
system with emptyDir volumes for /tmp and /dev/shm (NCCL and the data loader need shared memory),
and requests equal to limits for cpu, memory and the accelerator.

The base kustomization (manifests/base/training-job.yaml) is this module's output for the
repository's params.yaml, preset base, suspended; tests/manifests checks that it never drifts:

    distillery render-job --preset base --suspend --out manifests/base/training-job.yaml
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from components.config import ConfigError
from pipelines.params import PipelineParams

RUN_AS = 10001
"""uid and gid of every pod: the Dockerfiles' `USER 10001`."""
PARAMS_MOUNT = "/etc/distillery"
"""Where the ConfigMap of resolved parameters is mounted; the job reads params.yaml there."""
RESOLVED_PRESET = "resolved"
"""The one preset of the rendered parameters file (everything already laid over the base)."""
STAGES = ("base", "reinforce", "finetune")
PREVIOUS = {"reinforce": "base", "finetune": "reinforce"}
CONTAINER = {"PyTorchJob": "pytorch", "TrainJob": "node"}
"""The container name each operator expects: PyTorchJob's default container is `pytorch`; the
torch-distributed runtime's trainer job and container are both `node`."""
TRAINJOB_RUNTIME = "torch-distributed"
"""The ClusterTrainingRuntime a TrainJob refers to (installed with Kubeflow Trainer)."""
MASTER_PORT = 23456
"""The rendezvous port PyTorchJob's operator defaults to (container port `pytorchjob-port`)."""
LABELS = {"app.kubernetes.io/name": "distillery-train", "app.kubernetes.io/component": "training",
          "app.kubernetes.io/part-of": "distillery"}
"""Labels of the job and of its pods: the NetworkPolicy lets pods with these talk to each other."""


def check_topology(params: PipelineParams, stage: str = "base") -> None:
    """ConfigError unless the job's processes split evenly into pipeline x tensor parallel groups.

    Only the base stage runs pipeline / tensor parallelism (reinforce and finetune are data
    parallel), so only its train.pipeline_parallel * train.tensor_parallel is checked."""
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    c, t = params.cluster, params.train
    group = t.pipeline_parallel * t.tensor_parallel
    if stage == "base" and c.processes % group:
        raise ConfigError(
            f"cluster.nodes * cluster.gpus_per_node: {c.nodes} x {max(c.gpus_per_node, 1)} = {c.processes} "
            f"processes is not a multiple of train.pipeline_parallel * train.tensor_parallel = "
            f"{t.pipeline_parallel} x {t.tensor_parallel} = {group}")


def job_image(params: PipelineParams) -> str:
    """The job's image: pipelines/cluster.py `ClusterConfig.image_for` its pods' GPUs."""
    return params.cluster.image_for(params.cluster.gpus_per_node)


def job_name(stage: str) -> str:
    return f"distillery-train-{stage}"


def resolved_params(params: PipelineParams) -> str:
    """params as a params.yaml that load_params reads back into the same PipelineParams."""
    data = params.as_dict()
    data["preset"] = RESOLVED_PRESET
    data["presets"] = {RESOLVED_PRESET: {}}
    header = "# resolved parameters of the training job, written by pipelines/jobs.py: do not edit\n"
    return header + yaml.safe_dump(data, sort_keys=False)


def params_configmap(params: PipelineParams, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{name}-params", "namespace": params.cluster.namespace, "labels": dict(LABELS)},
            "data": {"params.yaml": resolved_params(params)}}


def _resources(params: PipelineParams) -> dict[str, dict[str, Any]]:
    c = params.cluster
    amounts: dict[str, Any] = {"cpu": c.cpu, "memory": c.memory}
    if c.gpus_per_node > 0:
        amounts[c.gpu_type] = c.gpus_per_node
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _env(params: PipelineParams) -> list[dict[str, Any]]:
    c = params.cluster
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},  # caches (triton, torch extensions) on the writable emptyDir
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "DISTILLERY_PARAMS", "value": f"{PARAMS_MOUNT}/params.yaml"},
    ]
    if c.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    if c.dvc_secret:  # "" : no DVC remote credentials at all
        env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": c.dvc_secret, "key": key, "optional": True}}}
                for key, var in sorted(c.dvc_secret_env.items())]
    return env


def _mounts(params: PipelineParams) -> list[dict[str, Any]]:
    return [{"name": "checkpoints", "mountPath": params.cluster.checkpoint_mount},
            {"name": "params", "mountPath": PARAMS_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"}]


def _volumes(params: PipelineParams, name: str) -> list[dict[str, Any]]:
    return [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": params.cluster.checkpoint_pvc}},
            {"name": "params", "configMap": {"name": f"{name}-params"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "runAsUser": RUN_AS, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def train_command(params: PipelineParams, stage: str, data: str, out: str, init: str | None) -> list[str]:
    c = params.cluster
    cmd = ["torchrun", f"--nnodes={c.nodes}", f"--nproc-per-node={max(c.gpus_per_node, 1)}",
           "-m", "pipelines.cli", "train", "--stage", stage, "--params", f"{PARAMS_MOUNT}/params.yaml",
           "--data", data, "--out", out]
    return cmd + (["--init", init] if init else [])


def _pytorchjob(params: PipelineParams, name: str, command: list[str], suspend: bool) -> dict[str, Any]:
    c = params.cluster
    container = {"name": CONTAINER["PyTorchJob"], "image": job_image(params), "imagePullPolicy": "IfNotPresent",
                 "command": command, "env": _env(params), "resources": _resources(params),
                 "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
                 "volumeMounts": _mounts(params), "securityContext": container_security_context()}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": "distillery-train", "automountServiceAccountToken": False,
        "securityContext": pod_security_context(), "containers": [container], "volumes": _volumes(params, name)}
    if c.node_selector:
        pod_spec["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in c.tolerations]

    def replica(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": dict(LABELS)}, "spec": copy.deepcopy(pod_spec)}}

    replicas = {"Master": replica(1)}
    if c.nodes > 1:
        replicas["Worker"] = replica(c.nodes - 1)
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": c.namespace, "labels": dict(LABELS)},
            "spec": {"nprocPerNode": str(max(c.gpus_per_node, 1)),
                     "runPolicy": {"backoffLimit": c.retries, "cleanPodPolicy": "Running", "suspend": suspend},
                     "pytorchReplicaSpecs": replicas}}


def _trainjob(params: PipelineParams, name: str, command: list[str], suspend: bool) -> dict[str, Any]:
    c = params.cluster
    override_spec: dict[str, Any] = {
        "serviceAccountName": "distillery-train", "securityContext": pod_security_context(),
        "containers": [{"name": CONTAINER["TrainJob"], "volumeMounts": _mounts(params),
                        "securityContext": container_security_context()}],
        "volumes": _volumes(params, name)}
    if c.node_selector:
        override_spec["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        override_spec["tolerations"] = [dict(t) for t in c.tolerations]
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": c.namespace, "labels": dict(LABELS)},
            "spec": {"runtimeRef": {"name": TRAINJOB_RUNTIME, "apiGroup": "trainer.kubeflow.org",
                                    "kind": "ClusterTrainingRuntime"},
                     "suspend": suspend,
                     "labels": dict(LABELS),
                     "trainer": {"image": job_image(params), "command": command, "env": _env(params),
                                 "numNodes": c.nodes, "numProcPerNode": max(c.gpus_per_node, 1),
                                 "resourcesPerNode": _resources(params)},
                     "podTemplateOverrides": [{"targetJobs": [{"name": CONTAINER["TrainJob"]}],
                                               "metadata": {"labels": dict(LABELS)},
                                               "spec": override_spec}]}}


def render_job(params: PipelineParams, stage: str = "base", data: str | None = None, out: str | None = None,
               init: str | None = None, name: str | None = None, suspend: bool = False) -> dict[str, Any]:
    """The PyTorchJob or TrainJob (cluster.job_kind) that trains `stage` across the cluster.

    data: the split folder (default <checkpoint_mount>/data/split); out: the stage's folder
    (default <checkpoint_mount>/<stage>); init: the previous stage's model folder for reinforce
    and finetune (default <checkpoint_mount>/<previous stage>/model); suspend: create it suspended
    (started later by setting runPolicy.suspend / spec.suspend to false)."""
    check_topology(params, stage)
    mount = params.cluster.checkpoint_mount.rstrip("/")
    data = data or f"{mount}/data/split"
    out = out or f"{mount}/{stage}"
    if stage in PREVIOUS:
        init = init or f"{mount}/{PREVIOUS[stage]}/model"
    elif init:
        raise ConfigError("--init: only the reinforce and finetune stages start from a previous model")
    name = name or job_name(stage)
    command = train_command(params, stage, data, out, init)
    build = _pytorchjob if params.cluster.job_kind == "PyTorchJob" else _trainjob
    return build(params, name, command, suspend)


def render_manifests(params: PipelineParams, stage: str = "base", **kwargs: Any) -> list[dict[str, Any]]:
    """[the ConfigMap of resolved parameters, the job]: what `kubectl apply -f` needs."""
    job = render_job(params, stage, **kwargs)
    return [params_configmap(params, job["metadata"]["name"]), job]


class _NoAliases(yaml.SafeDumper):
    """Plain YAML: a value used twice is written twice, never as an &anchor / *alias pair, and a
    multi-line string (the ConfigMap's params.yaml) as a readable literal block."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_NoAliases.add_representer(str, _str)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.dump(doc, Dumper=_NoAliases, sort_keys=False, width=120) for doc in docs)


def job_yaml(params: PipelineParams, stage: str = "base", **kwargs: Any) -> str:
    """The text write_job writes: a header saying where it comes from, the ConfigMap, the job."""
    docs = render_manifests(params, stage, **kwargs)
    header = (f"# {docs[1]['kind']} {docs[1]['metadata']['name']} and its parameters ConfigMap, rendered from\n"
              f"# params.yaml by pipelines/jobs.py (distillery render-job): render again, do not edit.\n")
    return header + dump_manifests(docs)


def write_job(params: PipelineParams, path: str | os.PathLike, stage: str = "base", **kwargs: Any) -> Path:
    """Write the ConfigMap and the job as one multi-document YAML file, atomically (a temporary
    file in the same folder, renamed over `path`): a failed render leaves the old file as it was."""
    path = Path(path)
    text = job_yaml(params, stage, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
