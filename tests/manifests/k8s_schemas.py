"""Offline validation of Kubernetes objects: built-in kinds with kubernetes-validate (strict),
custom resources with the CRD schemas kept in manifests/crds/.

    from k8s_schemas import validate_object, load_yaml_docs
    for doc in load_yaml_docs(Path("manifests/base/pvcs.yaml")):
        assert validate_object(doc) == []

The CRD files are trimmed copies of the operators' own (see their headers): a node marked
`x-distillery-k8s-ref: <name>` stands for an embedded Kubernetes type and becomes a JSON Schema
$ref into kubernetes-validate's definitions of Kubernetes K8S_VERSION (strict: unknown fields are
errors). Every other object node that lists properties gets additionalProperties: false, so a
misspelt field of the custom resource itself is an error too (the API server would prune it
silently). CEL rules (x-kubernetes-validations) cannot run here and are skipped.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crds"
K8S_VERSION = "1.32.0"
DEFS_URI = "https://kubernetes.io/api/_definitions.json"
REF_KEY = "x-distillery-k8s-ref"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The non-empty documents of a (multi-document) YAML file."""
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _definitions_path() -> Path:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = root / f"v{K8S_VERSION}-local-strict" / "_definitions.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: kubernetes-validate has no strict schema of Kubernetes {K8S_VERSION}")
    return path


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    import json

    defs = json.loads(_definitions_path().read_text(encoding="utf-8"))
    return Resource.from_contents(defs) @ Registry()


def _convert(node: Any) -> Any:
    """A CRD openAPIV3Schema node -> JSON Schema (draft 2020-12), strict about unknown fields."""
    if not isinstance(node, dict):
        return node
    if REF_KEY in node:
        return {"$ref": f"{DEFS_URI}#/$defs/{node[REF_KEY]}"}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _convert(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = _convert(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_convert(sub) for sub in value]
        elif key.startswith("x-kubernetes-") or key in ("description", "nullable", "default", "example"):
            continue
        else:
            out[key] = value
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """{(apiVersion, kind): JSON Schema} of every CRD version under manifests/crds/."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_yaml_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                raise ValueError(f"{path}: not a CustomResourceDefinition")
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _convert(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = {
                    "$ref": f"{DEFS_URI}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
                schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                schema["properties"]["kind"] = {"const": kind}
                schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
                out[(f"{group}/{version['name']}", kind)] = schema
    return out


def _where(err: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "<root>"


def validate_object(obj: dict[str, Any]) -> list[str]:
    """Problems of one object (empty: valid). Custom resources known to manifests/crds/ are
    checked against their CRD schema, everything else with kubernetes-validate, strict."""
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        return ["not a Kubernetes object (no apiVersion / kind)"]
    label = f"{obj['kind']}/{obj.get('metadata', {}).get('name', '?')}"
    problems = _name_problems(obj, label)
    schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema, registry=_registry())
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        return problems + [f"{label}: {_where(e)}: {e.message}" for e in errors]
    if "." in obj["apiVersion"].split("/")[0] and not obj["apiVersion"].split("/")[0].endswith(".k8s.io"):
        return problems + [f"{label}: {obj['apiVersion']} is a custom resource without a CRD in {CRD_DIR}"]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return problems + [f"{label}: {_where(err)}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return problems + [f"{label}: {err.message}"]
    return problems


def _name_problems(obj: dict[str, Any], label: str) -> list[str]:
    name = obj.get("metadata", {}).get("name", "")
    if not name or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return [f"{label}: metadata.name {name!r} is not a DNS-1123 subdomain"]
    if obj["kind"] in ("TrainJob", "Service") and (len(name) > 63 or not DNS1035_LABEL.match(name)):
        return [f"{label}: metadata.name {name!r} must be an RFC 1035 label (63 characters at most)"]
    return []


MANIFESTS = REPO / "manifests"
OVERLAYS = ("staging", "production")


def manifest_files() -> list[Path]:
    """Every resource file of the kustomize trees (base, overlays, vllm): the YAML files that are not
    kustomization.yaml. manifests/crds/ holds schemas, not resources, and is left out."""
    files = []
    for root in (MANIFESTS / "base", MANIFESTS / "overlays", MANIFESTS / "vllm"):
        files += [p for p in sorted(root.rglob("*.yaml")) if p.name != "kustomization.yaml"]
    return files


@functools.lru_cache(maxsize=None)
def kustomize(folder: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize manifests/<folder>` as objects (kubectl must be on PATH)."""
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl is not on PATH")
    proc = subprocess.run([kubectl, "kustomize", str(MANIFESTS / folder)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode:
        raise RuntimeError(f"kubectl kustomize manifests/{folder} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)
