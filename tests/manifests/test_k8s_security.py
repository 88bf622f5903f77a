"""Security of every workload the suite ships or renders: Pod Security "restricted" settings,
requests and limits on every container, Triton's health probes, no plaintext secrets, the
network policies (default deny; Triton reachable from the gateway only) and least-privilege RBAC.

    .venv/bin/python -m pytest -q tests/manifests/test_k8s_security.py

Sources checked: each file of manifests/base and manifests/overlays, each rendered overlay
(kubectl kustomize; skipped without kubectl), and the training job that pipelines/jobs.py renders
from params for both job kinds, GPU and CPU, one node and several. The mutation tests break one
rule at a time on a copy and check that the checkers notice.
"""

from __future__ import annotations

import copy
import re
import shutil
from typing import Any, Callable

import pytest

from k8s_schemas import MANIFESTS, OVERLAYS, kustomize, load_yaml_docs, manifest_files
from k8s_security import is_workload, probe_problems, secret_problems, workload_problems
from pipelines import jobs
from pipelines.params import load_params

HAS_KUBECTL = shutil.which("kubectl") is not None
TRITON = "distillery-triton"
GATEWAY_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "istio-system"}},
                "podSelector": {"matchLabels": {"istio": "ingressgateway"}}}
TRITON_PORTS = {8000: "http", 8001: "grpc"}


def _job(kind: str, gpus: int, nodes: int, stage: str = "base"):
    def load():
        params, _ = load_params(preset="base", overrides={"cluster": {"job_kind": kind, "gpus_per_node": gpus,
                                                                      "nodes": nodes}})
        return jobs.render_manifests(params, stage)
    return load


SOURCES: dict[str, Callable[[], Any]] = {
    **{f"file:{p.relative_to(MANIFESTS)}": (lambda p=p: load_yaml_docs(p)) for p in manifest_files()},
    **{f"kustomize:{f}": (lambda f=f: list(kustomize(f))) for f in ["base", "vllm"] + [f"overlays/{o}" for o in OVERLAYS]},
    "job:PyTorchJob-gpu-1node": _job("PyTorchJob", 8, 1),
    "job:PyTorchJob-gpu-3nodes": _job("PyTorchJob", 4, 3),
    "job:PyTorchJob-cpu-2nodes-finetune": _job("PyTorchJob", 0, 2, "finetune"),
    "job:TrainJob-gpu-2nodes": _job("TrainJob", 8, 2),
    "job:TrainJob-cpu-1node-reinforce": _job("TrainJob", 0, 1, "reinforce"),
}


def _load(source: str) -> list[dict[str, Any]]:
    if source.startswith("kustomize:") and not HAS_KUBECTL:
        pytest.skip("kubectl (with kustomize) is not on PATH: overlays not rendered")
    return SOURCES[source]()


@pytest.mark.parametrize("source", list(SOURCES))
def test_workloads_are_restricted(source):
    docs = _load(source)
    problems = [p for d in docs for p in workload_problems(d) + secret_problems(d)]
    assert problems == [], "\n".join(problems)


def test_the_sources_hold_every_kind_of_workload():
    """Not vacuous: the parametrized check above sees a Deployment, both job kinds, each replica type."""
    kinds = {d["kind"] for s in SOURCES if not s.startswith("kustomize:") for d in SOURCES[s]() if is_workload(d)}
    assert {"Deployment", "PyTorchJob", "TrainJob"} <= kinds
    job = next(d for d in SOURCES["job:PyTorchJob-gpu-3nodes"]() if d["kind"] == "PyTorchJob")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}


def test_triton_probes_its_health_endpoints():
    deployment = next(d for d in load_yaml_docs(MANIFESTS / "base" / "triton-deployment.yaml")
                      if d["kind"] == "Deployment")
    assert probe_problems(deployment) == []
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    models = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert models and all(mounts[n].get("readOnly") for n in models), "the model repository is mounted read-only"


def test_no_secret_material_in_the_repository_manifests():
    pattern = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----|AKIA[0-9A-Z]{16}|ghp_[0-9A-Za-z]{30,}")
    for path in sorted(MANIFESTS.rglob("*")):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert not pattern.search(text), f"{path}: looks like a credential"
            if path.suffix in (".yaml", ".yml"):
                assert all(not secret_problems(d) for d in load_yaml_docs(path)), path
    example = MANIFESTS / "secrets" / "dvc-remote.env.example"
    values = [line.split("=", 1)[1] for line in example.read_text().splitlines() if "=" in line and line[0] != "#"]
    assert values and all(v == "" for v in values), f"{example}: placeholders only"


# ---- mutations: each breaks one rule on a copy; the checker must name it -------------------------

def _triton() -> dict[str, Any]:
    return copy.deepcopy(load_yaml_docs(MANIFESTS / "base" / "triton-deployment.yaml")[0])


def _pod(obj):
    return obj["spec"]["template"]["spec"]


def _container(obj):
    return _pod(obj)["containers"][0]


def _drop_non_root(obj):
    _pod(obj)["securityContext"].pop("runAsNonRoot")
    _container(obj)["securityContext"].pop("runAsNonRoot")


def _root_uid(obj):
    _container(obj)["securityContext"]["runAsUser"] = 0


def _no_seccomp(obj):
    _pod(obj)["securityContext"].pop("seccompProfile")
    _container(obj)["securityContext"].pop("seccompProfile")


def _escalate(obj):
    _container(obj)["securityContext"]["allowPrivilegeEscalation"] = True


def _keep_caps(obj):
    _container(obj)["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}


def _add_cap(obj):
    _container(obj)["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]


def _writable_root(obj):
    _container(obj)["securityContext"].pop("readOnlyRootFilesystem")


def _no_memory_limit(obj):
    _container(obj)["resources"]["limits"].pop("memory")


def _init_without_resources(obj):
    c = copy.deepcopy(_container(obj))
    c.pop("resources")
    _pod(obj)["initContainers"] = [dict(c, name="init")]


def _literal_secret(obj):
    _container(obj)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})


def _host_path(obj):
    _pod(obj)["volumes"].append({"name": "host", "hostPath": {"path": "/"}})


def _host_network(obj):
    _pod(obj)["hostNetwork"] = True


MUTATIONS = {
    "drop runAsNonRoot": (_drop_non_root, "runAsNonRoot"),
    "runAsUser 0": (_root_uid, "runAsUser"),
    "no seccomp": (_no_seccomp, "seccompProfile"),
    "privilege escalation": (_escalate, "allowPrivilegeEscalation"),
    "capabilities kept": (_keep_caps, "drop ALL"),
    "capability added": (_add_cap, "SYS_ADMIN"),
    "writable root": (_writable_root, "readOnlyRootFilesystem"),
    "no memory limit": (_no_memory_limit, "no memory limit"),
    "init container without resources": (_init_without_resources, "initContainers[init]: no cpu request"),
    "literal secret env": (_literal_secret, "AWS_SECRET_ACCESS_KEY"),
    "hostPath volume": (_host_path, "hostPath"),
    "host network": (_host_network, "hostNetwork"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_checker_flags_a_broken_deployment(mutation):
    obj = _triton()
    assert workload_problems(obj) == []
    mutate, expected = MUTATIONS[mutation]
    mutate(obj)
    problems = workload_problems(obj)
    assert any(expected in p for p in problems), problems


def test_pod_level_settings_count_for_every_container():
    """Pod Security semantics: runAsNonRoot set on the pod covers a container that does not set it."""
    obj = _triton()
    _container(obj)["securityContext"].pop("runAsNonRoot")
    assert workload_problems(obj) == []


@pytest.mark.parametrize("kind", ["PyTorchJob", "TrainJob"])
def test_checker_flags_a_broken_training_job(kind):
    params, _ = load_params(preset="base", overrides={"cluster": {"job_kind": kind, "nodes": 2}})
    job = jobs.render_job(params)
    assert workload_problems(job) == []
    broken = copy.deepcopy(job)
    if kind == "PyTorchJob":
        pod = broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
        pod["securityContext"].pop("runAsNonRoot")
        pod["containers"][0]["securityContext"].pop("runAsNonRoot")
    else:
        override = broken["spec"]["podTemplateOverrides"][0]["spec"]
        override["securityContext"].pop("runAsNonRoot")
        override["containers"][0]["securityContext"].pop("runAsNonRoot")
    assert any("runAsNonRoot" in p for p in workload_problems(broken))
    broken = copy.deepcopy(job)
    if kind == "PyTorchJob":
        broken["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"][
            "requests"]["nvidia.com/gpu"] = 4
    else:
        broken["spec"]["trainer"]["resourcesPerNode"]["requests"]["nvidia.com/gpu"] = 4
    assert any("nvidia.com/gpu" in p for p in workload_problems(broken))
    broken = copy.deepcopy(job)
    if kind == "TrainJob":
        broken["spec"].pop("podTemplateOverrides")  # the runtime's defaults: nothing restricted
        assert any("runAsNonRoot" in p for p in workload_problems(broken))


def test_secret_checker_flags_committed_data():
    assert secret_problems({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                            "stringData": {"AWS_SECRET_ACCESS_KEY": "x"}})
    assert not secret_problems({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}})


# ---- network policies -----------------------------------------------------------------------------

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector selects pods with `labels` (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _covers(rule: dict[str, Any], port: int, name: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True  # no ports: every port
    for p in ports:
        if "port" not in p or p["port"] in (port, name):
            return True
        if isinstance(p["port"], int) and p.get("endPort") and p["port"] <= port <= p["endPort"]:
            return True
    return False


def network_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Default deny for the namespace, DNS egress, and Triton's inference ports open to the gateway only."""
    out = []
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and set(p["spec"].get("policyTypes", [])) ==
            {"Ingress", "Egress"} and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    if not deny:
        out.append("no default-deny policy (podSelector {}, Ingress and Egress, no rules)")
    dns = [r for p in policies if p["spec"]["podSelector"] == {} for r in p["spec"].get("egress") or []
           if any(q.get("port") == 53 for q in r.get("ports") or [])]
    if not dns:
        out.append("no DNS egress for every pod")
    triton = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == TRITON)
    labels = triton["spec"]["template"]["metadata"]["labels"]
    reachable = {port: False for port in TRITON_PORTS}
    for p in policies:
        if not _selects(p["spec"]["podSelector"], labels) or "Ingress" not in p["spec"].get("policyTypes", []):
            continue
        for rule in p["spec"].get("ingress") or []:
            for port, name in TRITON_PORTS.items():
                if not _covers(rule, port, name):
                    continue
                peers = rule.get("from")
                if not peers:
                    out.append(f"NetworkPolicy/{p['metadata']['name']}: Triton port {port} open to every source")
                for peer in peers or []:
                    if peer != GATEWAY_PEER:
                        out.append(f"NetworkPolicy/{p['metadata']['name']}: Triton port {port} open to {peer}")
                    else:
                        reachable[port] = True
    out += [f"Triton port {port} is not reachable from the gateway" for port, ok in reachable.items() if not ok]
    return out


NET_SOURCES = ["file:base/networkpolicies.yaml"] + [f"kustomize:overlays/{o}" for o in OVERLAYS]


@pytest.mark.parametrize("source", NET_SOURCES)
def test_network_policies(source):
    docs = _load(source)
    if source.startswith("file:"):
        docs = docs + load_yaml_docs(MANIFESTS / "base" / "triton-deployment.yaml")
    assert network_problems(docs) == []
    mesh = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "training-mesh")
    train = {"matchLabels": {"app.kubernetes.io/name": jobs.LABELS["app.kubernetes.io/name"]}}
    assert mesh["spec"]["podSelector"] == train
    assert mesh["spec"]["ingress"] == [{"from": [{"podSelector": train}]}]


def test_network_checker_flags_an_open_triton():
    docs = load_yaml_docs(MANIFESTS / "base" / "networkpolicies.yaml") + [_triton()]
    opened = copy.deepcopy(docs)
    gateway = next(d for d in opened if d["metadata"]["name"] == "triton-from-gateway")
    gateway["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    assert any("open to" in p for p in network_problems(opened))
    metrics_open = copy.deepcopy(docs)
    prom = next(d for d in metrics_open if d["metadata"]["name"] == "triton-metrics-from-prometheus")
    prom["spec"]["ingress"][0].pop("ports")  # Prometheus's rule now covers 8000 and 8001 too
    assert any("open to" in p for p in network_problems(metrics_open))
    no_deny = [d for d in docs if d["metadata"]["name"] != "default-deny-all"]
    assert any("default-deny" in p for p in network_problems(no_deny))


# ---- RBAC -------------------------------------------------------------------------------------------

def test_pipeline_role_is_least_privilege():
    docs = load_yaml_docs(MANIFESTS / "base" / "rbac.yaml")
    assert {d["kind"] for d in docs} == {"Role", "RoleBinding"}, "namespaced only, nothing cluster-wide"
    role = next(d for d in docs if d["kind"] == "Role")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"{field}: no wildcards ({rule})"
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule.get("resourceNames"), f"secrets by name, get only: {rule}"
        assert "escalate" not in rule["verbs"] and "bind" not in rule["verbs"] and "impersonate" not in rule["verbs"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    for group, resource in (("kubeflow.org", "pytorchjobs"), ("trainer.kubeflow.org", "trainjobs")):
        for verb in ("create", "get", "list", "watch", "delete"):
            assert (group, resource, verb) in granted
    assert ("", "pods/log", "get") in granted
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    accounts = {d["metadata"]["name"] for d in load_yaml_docs(MANIFESTS / "base" / "serviceaccounts.yaml")}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert all(s["kind"] == "ServiceAccount" and s["name"] in accounts for s in binding["subjects"])
