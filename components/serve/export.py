"""serve.export: a model folder -> a Triton model repository with numbered versions, and an ONNX scoring graph.

    from components.serve.export import export_repository, export_onnx
    export_repository("runs/finetune/model", "runs/triton")        # -> version 1, then 2, 3, ...
    export_onnx("runs/finetune/model", "scoring.onnx")             # verified with onnxruntime

    distillery export --checkpoint MODEL_FOLDER --repository REPOSITORY [--name distillery] [--set serve.export.onnx=true]

Layout written (both models share each version number, so `3` of generate and `3` of score are
the same weights):

    <repository>/<name>_generate/config.pbtxt        python backend, text in -> text out
    <repository>/<name>_generate/<N>/model.py        components/serve/triton_model.py, copied
    <repository>/<name>_generate/<N>/model_folder/   every file of the model folder, copied
    <repository>/<name>_generate/<N>/export.json     where it came from (path, sha256, time, code)
    <repository>/<name>_score/...                    the same, token ids in -> log-probs out
    <repository>/<name>_score/<N>/model.onnx         with ExportConfig.onnx: the scoring graph in ONNX
                                                     (an artifact beside the served one; the wheel has
                                                     no onnxruntime backend to serve it)

Each version folder is self-contained (weights, tokenizer and the backend code of its export), so
a later change to this package does not change what an older version serves; only the
`components` package that model.py imports (load_model) comes from the server's PYTHONPATH.

Atomic: everything is written into a hidden staging folder inside the repository and renamed into
place (same file system), version folder by version folder; a failure removes the staging folder
and any version already renamed, so the repository never holds a half-written version.

version_policy is `latest {num_versions: 1}`: loading a model serves its newest version. When the
newest fails to load, Triton keeps the version that was serving (see serve.check); a repository
with a broken newest version must not be loaded from scratch (on a new server nothing would serve),
so serve.check reports the failure and the broken version should be deleted or replaced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from components.serve.errors import ExportError
from components.serve.config import ExportConfig

BACKEND_SOURCE = Path(__file__).with_name("triton_model.py")
MODEL_DIR = "model_folder"
KINDS = ("generate", "score")


def model_name(name: str, kind: str) -> str:
    """Triton model name of `kind` ("generate" or "score") in a repository exported as `name`."""
    return f"{name}_{kind}"


def versions(model_dir: str | os.PathLike) -> list[int]:
    """The numbered version folders of one Triton model folder, ascending (none: [])."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def model_config(kind: str, name: str, cfg: ExportConfig) -> dict:
    """The Triton model configuration of one model, as the JSON form Triton's load API accepts."""
    io = {
        "generate": ([("text_input", "TYPE_STRING", [1])], [("text_output", "TYPE_STRING", [1])]),
        "score": ([("input_ids", "TYPE_INT64", [-1])], [("logprobs", "TYPE_FP32", [-1])]),
    }[kind]
    config = {
        "name": model_name(name, kind),
        "backend": "python",
        "max_batch_size": cfg.max_batch_size,
        "input": [{"name": n, "data_type": t, "dims": d} for n, t, d in io[0]],
        "output": [{"name": n, "data_type": t, "dims": d} for n, t, d in io[1]],
        "version_policy": {"latest": {"num_versions": 1}},
        "instance_group": [{"count": cfg.instances, "kind": "KIND_CPU"}],
        "parameters": {k: {"string_value": str(v)} for k, v in {
            "kind": kind, "max_tokens_default": cfg.max_tokens_default, "max_tokens_limit": cfg.max_tokens_limit,
            "torch_threads": cfg.torch_threads}.items()},
    }
    if cfg.dynamic_batching:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": cfg.max_queue_delay_us}
    return config


def to_pbtxt(config: dict) -> str:
    """config.pbtxt text (protobuf text format) of a `model_config` dict."""

    def value(v, indent: str) -> str:
        if isinstance(v, dict):
            inner = "".join(f"{indent}  {k}: {value(x, indent + '  ')}\n" for k, x in v.items())
            return "{\n" + inner + indent + "}"
        if isinstance(v, list):
            if all(isinstance(x, int) for x in v):
                return "[ " + ", ".join(map(str, v)) + " ]"
            return "[\n" + ",\n".join(f"{indent}  {value(x, indent + '  ')}" for x in v) + f"\n{indent}]"
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return str(v)
        if v.startswith(("TYPE_", "KIND_")):
            return v
        return json.dumps(v)

    lines = []
    for key, v in config.items():
        if key == "parameters":
            for k, p in v.items():
                text = json.dumps(p["string_value"])
                lines.append(f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {text} }} }}")
        else:
            lines.append(f"{key}: {value(v, '')}")
    return "\n".join(lines) + "\n"


def _check_model_folder(folder: Path) -> None:
    from components.model.folder import ModelFolderError

    for item in ("model.json", "model.safetensors", "tokenizer"):
        if not (folder / item).exists():
            raise ModelFolderError(f"{folder}: not a model folder (no {item})")


def _write_version(stage: Path, kind: str, name: str, version: int, folder: Path, cfg: ExportConfig,
                   provenance: dict) -> None:
    mdir = stage / model_name(name, kind)
    vdir = mdir / str(version)
    vdir.mkdir(parents=True)
    shutil.copy2(BACKEND_SOURCE, vdir / "model.py")
    shutil.copytree(folder, vdir / MODEL_DIR, symlinks=False)
    (vdir / "export.json").write_text(json.dumps({**provenance, "kind": kind}, indent=2) + "\n", encoding="utf-8")
    (mdir / "config.pbtxt").write_text(to_pbtxt(model_config(kind, name, cfg)), encoding="utf-8")


def export_repository(model_folder: str | os.PathLike, repository: str | os.PathLike, name: str | None = None,
                      version: int | None = None, cfg: ExportConfig | None = None) -> Path:
    """Add `model_folder` to the Triton repository as version `version` (default: the next free
    number across both models) of `<name>_generate` and `<name>_score`; returns the repository.

    `cfg` sets batching, instances and generation limits (config.pbtxt is rewritten with it: it is
    per model, shared by every version). An existing version is never overwritten.
    """
    from components.artifacts import code_version, sha256_path

    cfg = cfg or ExportConfig()
    name = name or cfg.name
    folder, repo = Path(model_folder), Path(repository)
    _check_model_folder(folder)
    repo.mkdir(parents=True, exist_ok=True)
    taken = sorted({v for kind in KINDS for v in versions(repo / model_name(name, kind))})
    if version is None:
        version = (taken[-1] if taken else 0) + 1
    elif version < 1:
        raise ExportError(f"--version {version}: Triton versions are positive integers")
    elif version in taken:
        raise ExportError(f"{repo}: version {version} of {name} exists; versions are never overwritten")
    provenance = {"version": version, "source": str(folder.resolve()), "sha256": sha256_path(folder),
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "code": code_version(), "export": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=repo))
    done: list[Path] = []
    try:
        for kind in KINDS:
            _write_version(stage, kind, name, version, folder, cfg, provenance)
        if cfg.onnx:
            export_onnx(folder, stage / model_name(name, "score") / str(version) / "model.onnx")
        for kind in KINDS:  # commit: one rename per version folder (or per new model folder)
            staged, final = stage / model_name(name, kind), repo / model_name(name, kind)
            if not final.exists():
                os.replace(staged, final)
                done.append(final)
            else:
                os.replace(staged / str(version), final / str(version))
                done.append(final / str(version))
                os.replace(staged / "config.pbtxt", final / "config.pbtxt")
    except BaseException:
        for path in done:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return repo


def export_onnx(model_folder: str | os.PathLike, path: str | os.PathLike, opset: int = 18,
                verify: bool = True, atol: float = 1e-4) -> Path:
    """The scoring graph (input_ids (B, T) int64 -> logprobs (B, T-1) float32, both axes dynamic,
    T within 2..block_size) as one ONNX file, written atomically; with `verify`, compared with the
    torch model through onnxruntime (see `verify_onnx`) and refused when it differs by more than atol.

    Uses torch's default (dynamo / torch.export) exporter, which handles the RoPE tables (buffers
    sliced to T) and scaled_dot_product_attention; needs `onnx` and `onnxscript`."""
    import torch

    from components.model.folder import load_model

    model, _ = load_model(model_folder)
    graph = score_graph(model)
    block = model.cfg.block_size
    example = torch.randint(0, model.cfg.vocab_size, (2, min(8, block)))
    dims = {"ids": {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("tokens", min=2, max=block)}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with _quiet_exporter():
            torch.onnx.export(graph, (example,), tmp, input_names=["input_ids"], output_names=["logprobs"],
                              dynamo=True, dynamic_shapes=dims, opset_version=opset, external_data=False,
                              verbose=False)
        if verify:
            err = verify_onnx(model_folder, tmp)
            if err > atol:
                raise ExportError(f"{path}: ONNX scoring graph differs from torch by {err:.3g} > atol {atol}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """torch's ONNX exporter without its notes (a missing torchvision, torch.export's deprecations):
    errors still raise, and nothing else of the command's output changes."""
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


VERIFY_MAX_TOKENS = 256


def verify_onnx(model_folder: str | os.PathLike, onnx_path: str | os.PathLike,
                shapes: tuple[tuple[int, int], ...] = ((1, 2), (3, 7), (2, 0)), seed: int = 0) -> float:
    """Largest |onnxruntime - torch| log-probability over random ids of `shapes` (B, T); T = 0
    stands for the model's block_size, up to VERIFY_MAX_TOKENS (an imported model's 8,192 tokens
    would take minutes and gigabytes of logits to check, and prove no more than 256 do)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from components.model.folder import load_model

    model, _ = load_model(model_folder)
    graph = score_graph(model)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b, t in shapes:
        ids = torch.randint(0, model.cfg.vocab_size, (b, t or min(model.cfg.block_size, VERIFY_MAX_TOKENS)),
                            generator=gen)
        with torch.inference_mode():
            ref = graph(ids).numpy()
        got = session.run(["logprobs"], {"input_ids": ids.numpy()})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{onnx_path}: output shape {got.shape} for ids {tuple(ids.shape)}, expected {ref.shape}")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def score_graph(model):
    """A module computing log p(ids[t] | ids[:t]) for t = 1..T-1 of ids (B, T): what `<name>_score`
    serves, as one traceable graph (B, T) int64 -> (B, T-1) float32."""
    import torch
    import torch.nn.functional as F

    class ScoreGraph(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.model = inner

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T-1)
            logits, _ = self.model(ids)  # (B, T, V)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            return logp.gather(-1, ids[:, 1:, None])[..., 0]

    return ScoreGraph(model).eval()


def run(cfg: ExportConfig, model_folder: str | os.PathLike, repository: str | os.PathLike,
        version: int | None = None) -> dict:
    """The serve.export step (CLI, KFP and DVC share it): export, then summarize for metrics."""
    repo = export_repository(model_folder, repository, version=version, cfg=cfg)
    version = version or versions(repo / model_name(cfg.name, "generate"))[-1]
    summary = {"version": version, "repository": str(repo),
               "models": [model_name(cfg.name, kind) for kind in KINDS]}
    if cfg.onnx:
        summary["onnx"] = str(repo / model_name(cfg.name, "score") / str(version) / "model.onnx")
    return summary
