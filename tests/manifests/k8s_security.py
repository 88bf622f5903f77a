"""The security rules every workload of the suite must keep, as plain checker functions.

    from k8s_security import workload_problems, secret_problems
    assert workload_problems(deployment) == []        # one line per violation otherwise

A workload is anything that makes pods: Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
CronJob, Pod, PyTorchJob (every replica's template), TrainJob (the pod template overrides plus the
trainer container they shape), InferenceService (the predictor). The rules are Pod Security
"restricted" and then some: every container and init container runs as a non-root, non-zero
uid (runAsNonRoot and runAsUser, pod or container level), with the RuntimeDefault seccomp
profile, allowPrivilegeEscalation false, capabilities drop ALL and add none, not privileged, a
read-only root file system, cpu and memory requests and limits (an extended resource such as a
GPU requested exactly as limited); no host namespaces, host ports or hostPath volumes; no
environment variable whose name looks secret (PASSWORD, SECRET, TOKEN, KEY, ... as a word of the
name) with a literal value: such values come from secretKeyRef. Secrets with data are never
committed (secret_problems).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

SECRET_NAME = re.compile(r"(?:^|_)(?:PASSWORD|PASSWD|SECRET|TOKEN|KEY|APIKEY|CREDENTIALS?)(?:_|$)", re.IGNORECASE)
POD_OWNERS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
WORKLOAD_KINDS = POD_OWNERS + ("CronJob", "Pod", "PyTorchJob", "TrainJob", "InferenceService")
TRAINJOB_CONTAINER = "node"
"""The trainer container of Kubeflow Trainer's torch runtimes, shaped by spec.trainer."""


def is_workload(obj: dict[str, Any]) -> bool:
    return obj.get("kind") in WORKLOAD_KINDS


def label(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name', '?')}"


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod a workload makes. For a TrainJob the pod spec is the one
    the job itself decides: each podTemplateOverrides spec, with the trainer container (image,
    command, env and resourcesPerNode from spec.trainer) merged into its `node` container."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind in POD_OWNERS:
        yield "spec.template.spec", spec.get("template", {}).get("spec") or {}
    elif kind == "CronJob":
        yield "spec.jobTemplate.spec.template.spec", spec["jobTemplate"]["spec"]["template"].get("spec") or {}
    elif kind == "Pod":
        yield "spec", spec
    elif kind == "PyTorchJob":
        for rtype, replica in (spec.get("pytorchReplicaSpecs") or {}).items():
            yield f"spec.pytorchReplicaSpecs.{rtype}.template.spec", replica.get("template", {}).get("spec") or {}
    elif kind == "TrainJob":
        yield from _trainjob_pods(spec)
    elif kind == "InferenceService":
        predictor = spec.get("predictor") or {}
        yield "spec.predictor", predictor


def _trainjob_pods(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    trainer = spec.get("trainer") or {}
    overrides = spec.get("podTemplateOverrides") or []
    if not overrides:  # nothing overrides the runtime's pods: the job sets none of the rules
        yield "spec.podTemplateOverrides", {"containers": [{"name": TRAINJOB_CONTAINER,
                                                             "resources": trainer.get("resourcesPerNode") or {}}]}
    for i, override in enumerate(overrides):
        pod = dict(override.get("spec") or {})
        containers = [dict(c) for c in pod.get("containers") or []]
        targets = {t.get("name") for t in override.get("targetJobs") or []}
        if TRAINJOB_CONTAINER in targets:
            node = next((c for c in containers if c.get("name") == TRAINJOB_CONTAINER), None)
            if node is None:
                node = {"name": TRAINJOB_CONTAINER}
                containers.append(node)
            node["resources"] = trainer.get("resourcesPerNode") or {}
            node["env"] = list(trainer.get("env") or []) + list(node.get("env") or [])
        pod["containers"] = containers
        yield f"spec.podTemplateOverrides[{i}].spec", pod


def _containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(field) or []:
            yield f"{field}[{c.get('name', '?')}]", c
    if "model" in pod:  # an InferenceService predictor's model spec is a container too
        yield "model", pod["model"]


def pod_problems(where: str, pod: dict[str, Any]) -> list[str]:
    """Violations of the rules above in one pod spec."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            out.append(f"{where}: {flag} is true")
    for volume in pod.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"{where}: volume {volume.get('name')}: hostPath")
    containers = list(_containers(pod))
    if not containers:
        out.append(f"{where}: no containers")
    for cwhere, c in containers:
        out += [f"{where}.{cwhere}: {p}" for p in container_problems(c, psc)]
    return out


def container_problems(c: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    sc = c.get("securityContext") or {}

    def effective(key: str) -> Any:
        return sc[key] if key in sc else pod_sc.get(key)

    if effective("runAsNonRoot") is not True:
        out.append("runAsNonRoot is not true")
    uid = effective("runAsUser")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid <= 0:
        out.append(f"runAsUser {uid!r} is not a non-zero uid")
    if (effective("seccompProfile") or {}).get("type") != "RuntimeDefault":
        out.append("seccompProfile is not RuntimeDefault")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation is not false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append("capabilities do not drop ALL")
    if caps.get("add"):
        out.append(f"capabilities add {caps['add']}")
    if sc.get("privileged"):
        out.append("privileged")
    if sc.get("readOnlyRootFilesystem") is not True:
        out.append("readOnlyRootFilesystem is not true")
    res = c.get("resources") or {}
    requests, limits = res.get("requests") or {}, res.get("limits") or {}
    for kind in ("cpu", "memory"):
        if kind not in requests:
            out.append(f"no {kind} request")
        if kind not in limits:
            out.append(f"no {kind} limit")
    for name, amount in limits.items():
        if "/" in name and str(requests.get(name)) != str(amount):
            out.append(f"{name}: request {requests.get(name)!r} differs from limit {amount!r}")
    for port in c.get("ports") or []:
        if port.get("hostPort"):
            out.append(f"hostPort {port['hostPort']}")
    for env in c.get("env") or []:
        if "value" in env and SECRET_NAME.search(env.get("name", "")):
            out.append(f"env {env['name']} has a literal value (use valueFrom.secretKeyRef)")
    return out


def workload_problems(obj: dict[str, Any]) -> list[str]:
    """Every violation in every pod a workload makes, each naming the object and the field."""
    if not is_workload(obj):
        return []
    return [f"{label(obj)} {p}" for where, pod in pod_specs(obj) for p in pod_problems(where, pod)]


def secret_problems(obj: dict[str, Any]) -> list[str]:
    """A Secret that carries data is a plaintext secret in the repository."""
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        return [f"{label(obj)}: a Secret with data in the manifests; reference it, create it out of band"]
    return []


def probe_problems(obj: dict[str, Any], live: str = "/v2/health/live", ready: str = "/v2/health/ready") -> list[str]:
    """Triton's containers must probe its health endpoints: liveness `live`, readiness `ready`,
    and have a startupProbe (loading the models takes a while)."""
    out: list[str] = []
    for where, pod in pod_specs(obj):
        for c in pod.get("containers") or []:
            for probe, path in (("livenessProbe", live), ("readinessProbe", ready)):
                got = ((c.get(probe) or {}).get("httpGet") or {}).get("path")
                if got != path:
                    out.append(f"{label(obj)} {where} {c.get('name')}: {probe} path {got!r}, expected {path!r}")
            if "startupProbe" not in c:
                out.append(f"{label(obj)} {where} {c.get('name')}: no startupProbe")
    return out
