"""Every manifest validates offline: the kustomize tree's files, each rendered overlay, against the
Kubernetes schemas (kubernetes-validate, strict) and, for custom resources, the CRD schemas kept
in manifests/crds/.

    .venv/bin/python -m pytest -q tests/manifests/test_k8s_manifests.py

The overlay renders need kubectl (with its built-in kustomize) on PATH; without it those tests
skip and say so.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import yaml

from k8s_schemas import (CRD_DIR, DEFS_URI, MANIFESTS, OVERLAYS, _definitions_path, crd_schemas, kustomize,
                         load_yaml_docs, manifest_files, validate_object)

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (with kustomize) is not on PATH: overlays not rendered")
NAMESPACED_NOT = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}


def _refs(node, found):
    if isinstance(node, dict):
        if "$ref" in node:
            found.add(node["$ref"])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)
    return found


def test_crd_schemas_name_their_source_and_resolve():
    import json

    files = sorted(CRD_DIR.glob("*.yaml"))
    assert {f.name for f in files} >= {"kubeflow.org_pytorchjobs.yaml", "trainer.kubeflow.org_trainjobs.yaml"}
    for f in files:
        head = f.read_text(encoding="utf-8").split("apiVersion:")[0]
        assert re.search(r"commit [0-9a-f]{40}", head), f"{f}: the header must name the upstream commit"
        assert "github.com/kubeflow/" in head, f"{f}: the header must name the upstream repository"
    schemas = crd_schemas()
    assert {("kubeflow.org/v1", "PyTorchJob"), ("trainer.kubeflow.org/v1alpha1", "TrainJob")} <= set(schemas)
    defs = json.loads(_definitions_path().read_text(encoding="utf-8"))["$defs"]
    for key, schema in schemas.items():
        refs = _refs(schema, set())
        assert refs, f"{key}: no embedded Kubernetes types referenced"
        for ref in refs:
            assert ref.startswith(DEFS_URI + "#/$defs/"), ref
            assert ref.split("/")[-1] in defs, f"{key}: {ref} is not a Kubernetes definition"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_file_validates(path):
    docs = load_yaml_docs(path)
    assert docs, f"{path}: no documents"
    problems = [p for doc in docs for p in validate_object(doc)]
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("folder", ["base", "vllm"] + [f"overlays/{o}" for o in OVERLAYS])
def test_kustomization_lists_existing_files(folder):
    kust = yaml.safe_load((MANIFESTS / folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kust["kind"] == "Kustomization"
    for res in kust.get("resources", []):
        assert (MANIFESTS / folder / res).exists(), f"manifests/{folder}/kustomization.yaml: {res} does not exist"
    listed = {(MANIFESTS / folder / r).resolve() for r in kust.get("resources", [])}
    for f in (MANIFESTS / folder).glob("*.yaml"):
        if f.name != "kustomization.yaml":
            assert f.resolve() in listed, f"{f} is not listed in manifests/{folder}/kustomization.yaml"


@needs_kubectl
@pytest.mark.parametrize("folder", ["base", "vllm"] + [f"overlays/{o}" for o in OVERLAYS])
def test_rendered_tree_validates(folder):
    docs = kustomize(folder)
    kinds = {d["kind"] for d in docs}
    expected = {"Deployment", "Service", "NetworkPolicy", "PersistentVolumeClaim", "ConfigMap"}
    if folder != "vllm":  # the vLLM path is the server alone, beside base's
        expected |= {"HorizontalPodAutoscaler", "PyTorchJob", "Role", "RoleBinding", "ServiceAccount"}
    assert expected <= kinds
    problems = [p for doc in docs for p in validate_object(doc)]
    assert problems == [], "\n".join(problems)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_sets_namespace_labels_images(overlay):
    docs = kustomize(f"overlays/{overlay}")
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    assert len(namespaces) == 1, "an overlay brings its own Namespace"
    ns = namespaces[0]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for d in docs:
        meta = d["metadata"]
        if d["kind"] not in NAMESPACED_NOT:
            assert meta.get("namespace") == ns["metadata"]["name"], f"{d['kind']}/{meta['name']}: namespace"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "distillery", f"{d['kind']}/{meta['name']}"
        assert meta["labels"]["distillery.dev/stage"] == overlay, f"{d['kind']}/{meta['name']}"
    images = [c["image"] for d in docs if d["kind"] == "Deployment"
              for c in d["spec"]["template"]["spec"]["containers"]]
    images += [c["image"] for d in docs if d["kind"] == "PyTorchJob"
               for r in d["spec"]["pytorchReplicaSpecs"].values() for c in r["template"]["spec"]["containers"]]
    kust = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text(encoding="utf-8"))
    tags = {i["name"]: i["newTag"] for i in kust["images"]}
    assert images, "no container images rendered"
    for image in images:
        name, _, tag = image.rpartition(":")
        assert tags.get(name) == tag, f"{image}: not retagged by the overlay's images: {tags}"


@needs_kubectl
def test_production_scales_wider_than_staging():
    def hpa(overlay):
        return next(d for d in kustomize(f"overlays/{overlay}") if d["kind"] == "HorizontalPodAutoscaler")["spec"]

    def deployment(overlay):
        return next(d for d in kustomize(f"overlays/{overlay}") if d["kind"] == "Deployment")["spec"]

    assert hpa("production")["minReplicas"] >= 2 and deployment("production")["replicas"] >= 2
    assert hpa("production")["maxReplicas"] > hpa("staging")["maxReplicas"]
    assert any(d["kind"] == "PodDisruptionBudget" for d in kustomize("overlays/production"))


def test_validator_catches_real_mistakes():
    """The validation above can fail: a misspelt field, a wrong type, an unknown kind."""
    deployment = load_yaml_docs(MANIFESTS / "base" / "triton-deployment.yaml")[0]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    assert any("livenesProbe" in p for p in validate_object(bad))
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    assert validate_object(bad)
    job = next(d for d in load_yaml_docs(MANIFESTS / "base" / "training-job.yaml") if d["kind"] == "PyTorchJob")
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicaz"] = 1
    assert any("replicaz" in p for p in validate_object(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = []
    assert validate_object(bad)
    assert validate_object({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    bad = copy.deepcopy(deployment)
    bad["metadata"]["name"] = "Triton_Server"
    assert any("DNS-1123" in p for p in validate_object(bad))


# ---- the vLLM serving path over a Hugging Face export -----------------------------------------

VLLM_ENGINE_ARGS = {"model", "tokenizer", "served_model_name", "dtype", "max_model_len", "gpu_memory_utilization",
                    "tensor_parallel_size", "pipeline_parallel_size", "trust_remote_code", "enforce_eager",
                    "disable_log_stats", "quantization", "max_num_seqs", "enable_prefix_caching", "seed",
                    "revision", "tokenizer_mode", "swap_space", "block_size"}
"""The vLLM AsyncEngineArgs fields model.json may set (a typo would only fail on the GPU cluster)."""


def test_the_vllm_model_repository_is_a_valid_triton_config_over_the_export_volume():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = MANIFESTS / "vllm" / "model-repository"
    config = text_format.Parse((repo / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.backend == "vllm" and [g.kind for g in config.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_MODEL]
    engine = json.loads((repo / "model.json").read_text())
    assert set(engine) <= VLLM_ENGINE_ARGS, set(engine) - VLLM_ENGINE_ARGS
    assert engine["trust_remote_code"] is False  # never run a checkpoint's own code
    (deployment,) = [d for d in load_yaml_docs(MANIFESTS / "vllm" / "triton-vllm-deployment.yaml")]
    pod = deployment["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert engine["model"].startswith(mounts["hf"] + "/")  # the model is on the export volume
    items = {i["key"]: i["path"] for v in pod["volumes"] if "configMap" in v for i in v["configMap"]["items"]}
    assert items == {"config.pbtxt": "config.pbtxt", "model.json": "1/model.json"}  # Triton's layout
    assert mounts["repository"] == "/models/distillery_vllm"
    assert "--model-repository=/models" in pod["containers"][0]["args"]
