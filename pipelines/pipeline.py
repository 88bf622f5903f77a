"""The distillery DAG for Kubeflow Pipelines v2, built from the steps' components.

    distillery compile --preset small --out pipeline.yaml   # upload in the Kubeflow UI
    distillery compile --cpu --out pipeline.yaml            # a cluster without GPUs
    distillery submit --host http://localhost:8080           # compile, upload, run (pipelines/submit.py)
    distillery run --preset tiny --out runs/tiny             # the same DAG with kfp.local

The run form (the pipeline's parameters) is flat and typed: `preset`, the data source, each
training stage's steps and learning rate, the promotion gate (`RUN_FORM_NUMBERS`,
`GATE_PARAMETERS`). Each has a description, taken by KFP from the `Args:` section of the
pipeline function's docstring (`_run_form_doc`) into the IR. Every other setting is resolved at
compile time: every preset of the params file, whole, goes into the components as a constant
(`config`, {preset: {section: values}}), and each step picks the run's preset and lays the
form's values over it (components/kfp_io.py `preset_config`); a number left at 0 keeps the
preset's. `source_uri` empty means the built-in synthetic sample set; otherwise it is a path
that the component's container can read (a mounted volume): object-store URIs (gs://, s3://)
are not read yet.

Compiled for a cluster (`compile`, `submit`, `schedule`), the `cluster` section of params.yaml
becomes kfp-kubernetes platform settings of the tasks; it is never a run parameter (`--cpu`:
no GPUs, node selector or tolerations; `cluster_asks` says what a compile asks for):

| task | settings |
|---|---|
| train-base, train-reinforce, train-finetune, distill | `gpu_type` accelerators: `gpus_per_node` for train-base (one training process per GPU, in the train section's pp x tp x dp layout, components/train/launch.py), one for the others (one process each); none when `gpus_per_node` is 0; cpu and memory requests = limits, node selector, tolerations, the checkpoint PVC at `checkpoint_mount` (and `DISTILLERY_CHECKPOINT_DIR` pointing there: the step trains on the volume, so a retried pod resumes from its last checkpoint), retries with a long window |
| train-base (also) | HF_TOKEN from the `hf_secret` Secret's key `token` (optional), for a `base_model` of hf://org/name |
| evaluate-stages | one accelerator (it runs one inference process), cpu/memory, node selector, tolerations, retries |
| ingest | the DVC remote's credentials from the `dvc_secret` Secret as environment variables (optional: without the Secret ingest still reads a mounted path), retries |
| serve-check | retries (a live server: ports, start-up races); caching off |
| promote | the registry PVC at `registry_mount` (a relative `registry.root` moves under it); no retry and caching off: it changes the registry |

Only ingest gets the DVC credentials: it is the one step that reads the data source; every
other step reads and writes KFP artifacts through the pipeline root, whose credentials KFP
itself holds (least privilege: a training pod has no key to the data remote).

`distillery run` (kfp.local) builds the DAG without any of this: kfp.local honours retries
(a failing local step would be re-run after a back-off, minutes lost on a deterministic error)
and ignores the rest with warnings.
"""


import json
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from kfp import compiler, dsl, kubernetes

from components.compress import component as compress
from components.config import ConfigError
from components.data import component as data
from components.kfp_io import CHECKPOINT_ENV
from components.registry import component as registry
from components.serve import component as serve
from components.train import component as training
from pipelines.cluster import PIPELINE_NAME, ClusterConfig
from pipelines.params import PipelineParams, load_params, preset_names

@dataclass(frozen=True)
class LocalSettings:
    """What build_pipeline sets on the tasks of a local run (never on a compiled one)."""

    code: str
    """$DISTILLERY_CODE on every task: a digest of the suite's source (part of each cache key)."""
    ingest_key: str
    """ingest's cache key: its source file's content and its parameters."""


TASK_ORDER = ["ingest", "validate", "filter-rows", "split", "train-base", "train-reinforce", "train-finetune",
              "evaluate-stages", "distill", "quantize", "serve-export", "serve-check", "promote"]
"""Every task, in the order the pipeline reads (kfp.local may run independent ones in another)."""
LOCAL_PRESET = "local"
"""The name a local run's one preset goes by (`distillery run` resolves its parameters first)."""
TRAINING_TASKS = ("train-base", "train-reinforce", "train-finetune", "distill")
"""Steps that train on DeepSpeed: GPUs, the checkpoint volume, long retries."""
MULTI_GPU_TASKS = ("train-base",)
"""Steps that start one process per GPU of the pod (components/train/launch.py): all of the node's
GPUs; the other GPU steps run one process and get one."""
GPU_TASKS = TRAINING_TASKS + ("evaluate-stages",)
"""Steps that run on the GPU nodes (node selector and tolerations)."""
DVC_TASKS = ("ingest",)
"""Steps that read the DVC remote: its credentials as environment variables."""
RETRY_TASKS = ("ingest", *GPU_TASKS, "serve-check")
"""Steps that can flake (network, preempted or failing nodes, server start-up); every other
step is deterministic (a retry repeats the failure) or has side effects (promote)."""
NO_CACHE_TASKS = ("ingest", "serve-check", "promote")
"""Steps never served from KFP's cache: a path the cache key cannot see, a live check, a side effect."""
RETRY_BACKOFF = {"backoff_duration": "30s", "backoff_factor": 2, "backoff_max_duration": "1h"}
"""Back-off of the short steps: 30 s, 60 s, ... within an hour of the first attempt."""
TRAINING_RETRY_BACKOFF = {"backoff_duration": "60s", "backoff_factor": 2, "backoff_max_duration": "7d"}
"""Back-off of the GPU steps. Argo counts the window from the first attempt's start, so a
training step that fails after ten hours must still be inside it to be retried."""
RUN_FORM_NUMBERS = {
    "generate_rows": ("generate.rows", "Rows of the built-in synthetic sample set (when source_uri is empty)"),
    "train_steps": ("train.steps", "Base-stage optimizer steps (the preset's warm-up and curriculum must fit)"),
    "train_lr": ("train.lr", "Base-stage peak learning rate"),
    "reinforce_steps": ("reinforce.steps", "GRPO (reinforce stage) optimizer steps, a multiple of the preset's "
                        "reinforce.updates_per_batch"),
    "reinforce_lr": ("reinforce.lr", "GRPO (reinforce stage) learning rate"),
    "finetune_steps": ("finetune.steps", "Supervised fine-tune optimizer steps"),
    "finetune_lr": ("finetune.lr", "Supervised fine-tune learning rate"),
    "distill_steps": ("distill.steps", "Student (distillation) optimizer steps"),
    "distill_lr": ("distill.lr", "Student (distillation) learning rate"),
}
"""Run-form numbers whose default, 0, keeps the chosen preset's value: name -> (params key, what it is).
The components lay the same keys over their config (components/*/component.py)."""
GATE_PARAMETERS = {
    "gate_metric": ("registry.gate.metric", "The metric a new model must improve over the production model's "
                    "to be promoted to staging"),
    "gate_min_gain": ("registry.gate.min_gain", "The improvement required on gate_metric: candidate - production "
                      "> this (0: any strict gain)"),
    "gate_minimums": ("registry.gate.minimums", 'Absolute floors every candidate must reach, the first one too, '
                      'e.g. {"accuracy": 0.05}'),
}
"""Run-form values of the promotion gate, not tied to a preset: the form's value is the one used,
its default the compiled preset's."""
CPU_ONLY = {"gpus_per_node": 0, "node_selector": {}, "tolerations": []}
"""`--cpu`: the cluster settings for a cluster without GPUs: no accelerator asked for, no GPU node
selector or tolerations, so every task runs the CPU image (`ClusterConfig.image_for(0)`)."""
TOLERATION_KEYS = {"key", "operator", "value", "effect"}
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def build_pipeline(presets: dict[str, PipelineParams], preset: str, cluster: ClusterConfig | None = None,
                   local: LocalSettings | None = None) -> Any:
    """The pipeline function. Its run form is flat (see the module's docstring), with `preset` the
    default one; every preset of `presets` goes into the components whole, as a compile-time
    constant, so the form can pick any of them. With `cluster`, every task also gets its
    Kubernetes settings (`apply_cluster`); with `local` (a kfp.local run, pipelines/local.py), the
    code digest on every task and ingest's content-based cache key."""
    if preset not in presets:
        raise ConfigError(f"preset: {preset!r} is not among the presets compiled in ({', '.join(presets) or 'none'})")
    default = preset
    sections = {}
    for name, params in presets.items():
        p = params.as_dict()
        p.pop("cluster")  # compile-time only: never reaches a step
        if cluster is not None:  # promote writes onto the registry volume, whichever preset runs
            p["registry"]["root"] = registry_root_on_cluster(params.registry.root, cluster)
        sections[name] = p

    def config(*names: str) -> dict[str, dict[str, Any]]:
        """A component's `config`: every preset's `names` sections."""
        return {preset_name: {n: p[n] for n in names} for preset_name, p in sections.items()}

    gate = sections[default]["registry"]["gate"]

    def distillery(
        preset: str = default,
        source_uri: str = "",
        source_fields: dict = {},  # a mutable default: KFP reads it; nothing changes it
        base_model: str = "",
        generate_rows: int = 0,
        train_steps: int = 0,
        train_lr: float = 0.0,
        reinforce_steps: int = 0,
        reinforce_lr: float = 0.0,
        finetune_steps: int = 0,
        finetune_lr: float = 0.0,
        distill_steps: int = 0,
        distill_lr: float = 0.0,
        gate_metric: str = gate["metric"],
        gate_min_gain: float = gate["min_gain"],
        gate_minimums: dict = gate["minimums"],
    ):
        ingest = data.ingest(source_uri=source_uri, preset=preset, config=config("source", "generate"),
                             source_fields=source_fields, generate_rows=generate_rows)
        ingest.set_display_name("ingest")
        validate = data.validate(raw=ingest.outputs["raw"], preset=preset, config=config("source", "validate"),
                                 source_fields=source_fields)
        validate.set_display_name("validate")
        kept = data.filter_rows(clean=validate.outputs["clean"], preset=preset, config=config("filter"))
        kept.set_display_name("filter")
        split = data.split(kept=kept.outputs["kept"], preset=preset, config=config("split"))
        split.set_display_name("split")
        splits = split.outputs["splits"]
        base = training.train_base(splits=splits, preset=preset, config=config("tokenizer", "model", "train"),
                                   train_steps=train_steps, train_lr=train_lr, base_model=base_model)
        base.set_display_name("train base")
        reinforce = training.train_reinforce(base_model=base.outputs["model"], splits=splits, preset=preset,
                                             config=config("reinforce"), reinforce_steps=reinforce_steps,
                                             reinforce_lr=reinforce_lr)
        reinforce.set_display_name("train reinforce (GRPO)")
        finetune = training.train_finetune(init_model=reinforce.outputs["model"], splits=splits, preset=preset,
                                           config=config("finetune"), finetune_steps=finetune_steps,
                                           finetune_lr=finetune_lr)
        finetune.set_display_name("train finetune")
        evaluation = training.evaluate_stages(base_model=base.outputs["model"],
                                              reinforce_model=reinforce.outputs["model"],
                                              finetune_model=finetune.outputs["model"],
                                              splits=splits, preset=preset, config=config("evaluate"))
        evaluation.set_display_name("evaluate stages")
        student = compress.distill(teacher=finetune.outputs["model"], splits=splits, preset=preset,
                                   config=config("distill"), distill_steps=distill_steps, distill_lr=distill_lr)
        student.set_display_name("distill")
        int8 = compress.quantize(float_model=student.outputs["model"], splits=splits, preset=preset,
                                 config=config("quantize"))
        int8.set_display_name("quantize (INT8)")
        repo = serve.serve_export(model=int8.outputs["model"], preset=preset, config=config("serve"))
        repo.set_display_name("serve.export (Triton repository)")
        checked = serve.serve_check(repository=repo.outputs["repository"], preset=preset, config=config("serve"))
        checked.set_display_name("serve.check (real tritonserver)")
        promoted = registry.promote(model=int8.outputs["model"], check=checked.outputs["check"], preset=preset,
                                    config=config("registry"), gate_metric=gate_metric, gate_min_gain=gate_min_gain,
                                    gate_minimums=gate_minimums)
        promoted.set_display_name("registry.promote (staging, gated)")
        tasks = [ingest, validate, kept, split, base, reinforce, finetune, evaluation, student, int8, repo,
                 checked, promoted]
        # ingest reads a path whose content KFP's cache key cannot see; serve.check tests a live
        # server (a cached pass proves nothing); promote changes the registry
        for task in tasks:
            if task.name in NO_CACHE_TASKS:
                task.set_caching_options(False)
            if local is not None:
                task.set_env_variable("DISTILLERY_CODE", local.code)  # joins kfp.local's cache key
        if local is not None:  # locally ingest's key is its source file's content and parameters
            ingest.set_caching_options(True, cache_key=local.ingest_key)
        if cluster is not None:
            apply_cluster({task.name: task for task in tasks}, cluster)

    distillery.__doc__ = _run_form_doc(sections, default)  # read by the decorator: set it first
    return dsl.pipeline(name=PIPELINE_NAME, description="Raw data in, a served and versioned language model out.")(
        distillery)


def _run_form_doc(sections: dict[str, dict[str, Any]], default: str) -> str:
    """The pipeline function's docstring. KFP reads its Google-style `Args:` section into the IR
    (`root.inputDefinitions.parameters.<name>.description`), which the Kubeflow UI shows beside
    each field of the run form; the presets' own values are written out, so the form says what
    0 keeps."""
    names = list(sections)
    compiled = sections[default]
    args = {
        "preset": f"The step settings to run: one of {', '.join(names)} (compiled: {default}). The numbers below "
                  f"left at 0 take this preset's values; every other setting comes with it.",
        "source_uri": "The raw data file (JSONL, Parquet, CSV or plain text) at a path the pods can read (a mounted "
                      "volume); empty: the built-in synthetic sample set. Object-store URIs (gs://, s3://) are not "
                      "read yet.",
        "source_fields": 'The data\'s field names by canonical name (id, prompt, response, answer), e.g. {"prompt": '
                         '"question", "response": "answer"} for GSM8K; it replaces the whole mapping; {} keeps the '
                         f"preset's: {json.dumps(compiled['source']['fields'])}.",
        "base_model": "A pretrained model to start from instead of training one from scratch (the base stage then "
                      "continues its pretraining): a Hugging Face folder (Llama, Qwen2 or Mistral; safetensors) or "
                      "a .gguf file at a path the pods can read, one of distillery's model folders, or "
                      "hf://organisation/name[@revision], downloaded by the train-base step (token: the "
                      "cluster.hf_secret Secret). Empty: from scratch.",
    }
    for name, (key, text) in RUN_FORM_NUMBERS.items():
        values = ", ".join(f"{preset} {_shown(_at(p, key))}" for preset, p in sections.items())
        args[name] = f"{text}; 0 keeps the preset's: {values}."
    for name, (key, text) in GATE_PARAMETERS.items():
        args[name] = f"{text}. Default: the compiled preset's ({default}); this value applies whichever preset runs."
        if len({json.dumps(_at(p, key), sort_keys=True) for p in sections.values()}) > 1:
            args[name] += " The presets' own: " + ", ".join(f"{preset} {_shown(_at(p, key))}"
                                                           for preset, p in sections.items()) + "."
    return "Raw data in, a served and versioned language model out.\n\nArgs:\n" + "".join(
        f"    {name}: {text}\n" for name, text in args.items())


def _at(sections: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        sections = sections[key]
    return sections


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def apply_cluster(tasks: dict[str, Any], cluster: ClusterConfig) -> None:
    """Put the cluster settings on the pipeline's tasks (name -> PipelineTask); see the table at
    the top of this module. Settings the config leaves empty are left out."""
    missing = [name for name in (*GPU_TASKS, *DVC_TASKS, "serve-check", "promote") if name not in tasks]
    if missing:
        raise ValueError(f"apply_cluster: the pipeline has no task(s) {', '.join(missing)}")
    tolerations = [_toleration(i, t) for i, t in enumerate(cluster.tolerations)]
    if cluster.gpus_per_node > 0 and not cluster.gpu_type:
        raise ConfigError(f"cluster.gpu_type: empty, with gpus_per_node {cluster.gpus_per_node} (set 0 for CPUs)")
    for name, task in tasks.items():
        gpus = 0
        if name in GPU_TASKS:
            gpus = cluster.gpus_per_node if name in MULTI_GPU_TASKS else min(cluster.gpus_per_node, 1)
        task.set_container_image(cluster.image_for(gpus))  # the CUDA build where a task has GPUs
        if name in GPU_TASKS:
            if gpus > 0:
                task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(gpus)
            _resources(task, cluster)
            for label, value in cluster.node_selector.items():
                kubernetes.add_node_selector(task, label_key=label, label_value=value)
            for toleration in tolerations:
                kubernetes.add_toleration(task, **toleration)
        if name in TRAINING_TASKS and cluster.checkpoint_pvc:
            kubernetes.mount_pvc(task, pvc_name=cluster.checkpoint_pvc, mount_path=cluster.checkpoint_mount)
            task.set_env_variable(CHECKPOINT_ENV, cluster.checkpoint_mount)
        if name == "train-base" and cluster.hf_secret:  # hf:// base models: optional, public ones need none
            kubernetes.use_secret_as_env(task, secret_name=cluster.hf_secret, secret_key_to_env={"token": "HF_TOKEN"},
                                         optional=True)
        if name in DVC_TASKS and cluster.dvc_secret and cluster.dvc_secret_env:
            kubernetes.use_secret_as_env(task, secret_name=cluster.dvc_secret,  # optional: a cluster without
                                         secret_key_to_env=dict(cluster.dvc_secret_env),  # it reads mounted paths
                                         optional=True)
        if name == "promote" and cluster.registry_pvc:
            kubernetes.mount_pvc(task, pvc_name=cluster.registry_pvc, mount_path=cluster.registry_mount)
        if name in RETRY_TASKS and cluster.retries > 0:
            task.set_retry(num_retries=cluster.retries,
                           **(TRAINING_RETRY_BACKOFF if name in GPU_TASKS else RETRY_BACKOFF))


def registry_root_on_cluster(root: str, cluster: ClusterConfig) -> str:
    """registry.root as promote sees it on a cluster: a relative root goes under the registry
    volume (`runs/registry` -> `/mnt/registry/registry`); an absolute one must already be there,
    or the registry would live on the pod's own disk and vanish with it."""
    path = PurePosixPath(root)
    mount = PurePosixPath(cluster.registry_mount)
    if not path.is_absolute():
        return str(mount / path.name)
    if cluster.registry_pvc and mount not in path.parents and path != mount:
        raise ConfigError(f"registry.root: {root} is not under cluster.registry_mount ({mount}): on a cluster "
                          f"promote would write the registry onto the pod's own disk, lost when the pod ends")
    return root


def _resources(task: Any, cluster: ClusterConfig) -> None:
    """cpu and memory requests equal to their limits (a training pod is not overcommitted)."""
    try:
        task.set_cpu_request(cluster.cpu).set_cpu_limit(cluster.cpu)
    except ValueError as err:
        raise ConfigError(f"cluster.cpu: {cluster.cpu!r}: {err}") from None
    try:
        task.set_memory_request(cluster.memory).set_memory_limit(cluster.memory)
    except ValueError as err:
        raise ConfigError(f"cluster.memory: {cluster.memory!r}: {err}") from None


def _toleration(index: int, toleration: dict[str, str]) -> dict[str, str]:
    """One entry of cluster.tolerations, checked (kfp-kubernetes would write anything)."""
    where = f"cluster.tolerations[{index}]"
    unknown = set(toleration) - TOLERATION_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(sorted(TOLERATION_KEYS))}")
    operator = toleration.get("operator", "Equal")
    if operator not in TOLERATION_OPERATORS:
        raise ConfigError(f"{where}.operator: {operator!r} is not one of {', '.join(TOLERATION_OPERATORS)}")
    effect = toleration.get("effect")
    if effect is not None and effect not in TOLERATION_EFFECTS:
        raise ConfigError(f"{where}.effect: {effect!r} is not one of {', '.join(TOLERATION_EFFECTS)}")
    if operator == "Exists" and toleration.get("value"):
        raise ConfigError(f"{where}: operator Exists takes no value")
    if not toleration.get("key") and operator != "Exists":
        raise ConfigError(f"{where}: an empty key needs operator Exists (it matches every taint)")
    return {"key": toleration.get("key"), "operator": operator, "value": toleration.get("value"), "effect": effect}


def resolve_presets(path: str | os.PathLike | None = None, preset: str | None = None,
                    overrides: dict[str, Any] | None = None) -> tuple[dict[str, PipelineParams], str]:
    """(every preset of the params file at `path`, each with `overrides` (--set) laid over it; the
    chosen one's name). The chosen one (`preset`, default: the params file as it is) is loaded as
    every other command loads it, so the run form's default is what `distillery params` shows."""
    params, chosen = load_params(path, preset, overrides)
    presets = {name: params if name == chosen else load_params(path, name, overrides)[0]
               for name in preset_names(path)}
    presets.setdefault(chosen, params)
    return presets, chosen


def compile_pipeline(out: str, path: str | os.PathLike | None = None, preset: str | None = None,
                     overrides: dict[str, Any] | None = None, on_cluster: bool = True, cpu: bool = False) -> str:
    """Write the pipeline's IR YAML to `out`, with every preset of the params file (`resolve_presets`)
    and `preset` the run form's default; with the cluster settings unless `on_cluster` is False,
    and with `cpu` those of a cluster without GPUs (`CPU_ONLY`). Returns `cluster_asks`' line."""
    if cpu:
        overrides = {**(overrides or {})}
        overrides["cluster"] = {**overrides.get("cluster", {}), **CPU_ONLY}
    presets, chosen = resolve_presets(path, preset, overrides)
    cluster = presets[chosen].cluster if on_cluster else None
    compiler.Compiler().compile(build_pipeline(presets, chosen, cluster), package_path=out)
    return cluster_asks(cluster) if cluster is not None else "no cluster settings (a local build)"


def cluster_asks(cluster: ClusterConfig) -> str:
    """One line: what a pipeline compiled with `cluster` asks of the cluster (GPUs, the Secret, the
    volumes), so that a default compile's 8 GPUs and DVC Secret surprise nobody."""
    if cluster.gpus_per_node > 0:
        others = [t for t in GPU_TASKS if t not in MULTI_GPU_TASKS]
        gpus = f"{cluster.gpus_per_node} {cluster.gpu_type} on {', '.join(MULTI_GPU_TASKS)} and 1 on {', '.join(others)}"
    else:
        gpus = "no GPUs (the CPU image everywhere)"
    secret = (f"Secret {cluster.dvc_secret} on ingest (optional)" if cluster.dvc_secret and cluster.dvc_secret_env
              else "no Secret")
    pvcs = ", ".join(pvc for pvc in (cluster.checkpoint_pvc, cluster.registry_pvc) if pvc) or "none"
    return (f"asks the cluster for {gpus}; {secret}; PVCs {pvcs} "
            f"(params.yaml `cluster`; --set cluster.KEY=VALUE, --cpu)")
