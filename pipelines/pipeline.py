"""The distillery DAG for Kubeflow Pipelines v2, built from the steps' components.

    distillery compile --preset small --out pipeline.yaml   # upload in the Kubeflow UI
    distillery submit --host http://localhost:8080           # compile, upload, run (pipelines/submit.py)
    distillery run --preset tiny --out runs/tiny             # the same DAG with kfp.local

The step configs are pipeline parameters (one mapping per step), their defaults baked in from
the chosen preset of params.yaml at compile time, so a user can change any of them in the
Kubeflow UI's run form. `source_uri` empty means the built-in synthetic sample set; otherwise it
is a path that the component's container can read (a mounted volume): object-store URIs
(gs://, s3://) are not read yet.

Compiled for a cluster (`compile`, `submit`, `schedule`), the `cluster` section of params.yaml
becomes kfp-kubernetes platform settings of the tasks; it is never a run parameter:

| task | settings |
|---|---|
| train-base, train-reinforce, train-finetune, distill | `gpu_type` accelerators: `gpus_per_node` for train-base (one training process per GPU, in the train section's pp x tp x dp layout, components/train/launch.py), one for the others (one process each); none when `gpus_per_node` is 0; cpu and memory requests = limits, node selector, tolerations, the checkpoint PVC at `checkpoint_mount` (and `DISTILLERY_CHECKPOINT_DIR` pointing there: the step trains on the volume, so a retried pod resumes from its last checkpoint), retries with a long window |
| evaluate-stages | one accelerator (it runs one inference process), cpu/memory, node selector, tolerations, retries |
| ingest | the DVC remote's credentials from the `dvc_secret` Secret as environment variables, retries |
| serve-check | retries (a live server: ports, start-up races); caching off |
| promote | the registry PVC at `registry_mount` (a relative `registry.root` moves under it); no retry and caching off: it changes the registry |

Only ingest gets the DVC credentials: it is the one step that reads the data source; every
other step reads and writes KFP artifacts through the pipeline root, whose credentials KFP
itself holds (least privilege: a training pod has no key to the data remote).

`distillery run` (kfp.local) builds the DAG without any of this: kfp.local honours retries
(a failing local step would be re-run after a back-off, minutes lost on a deterministic error)
and ignores the rest with warnings.
"""


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
from pipelines.cluster import ClusterConfig
from pipelines.local import PIPELINE_NAME, LocalSettings
from pipelines.params import PipelineParams

TASK_ORDER = ["ingest", "validate", "filter-rows", "split", "train-base", "train-reinforce", "train-finetune",
              "evaluate-stages", "distill", "quantize", "serve-export", "serve-check", "promote"]
"""Every task, in the order the pipeline reads (kfp.local may run independent ones in another)."""
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
TOLERATION_KEYS = {"key", "operator", "value", "effect"}
TOLERATION_OPERATORS = ("Equal", "Exists")
TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def build_pipeline(params: PipelineParams, cluster: ClusterConfig | None = None,
                   local: LocalSettings | None = None) -> Any:
    """The pipeline function, with `params` as its parameters' defaults; with `cluster`, every
    task also gets its Kubernetes settings (`apply_cluster`); with `local` (a kfp.local run,
    pipelines/local.py), the code digest on every task and ingest's content-based cache key."""
    p = params.as_dict()
    p.pop("cluster")  # compile-time only: never a run parameter
    if cluster is not None:
        p["registry"] = {**p["registry"], "root": registry_root_on_cluster(params.registry.root, cluster)}

    @dsl.pipeline(name=PIPELINE_NAME, description="Raw data in, a served and versioned language model out.")
    def distillery(
        source_uri: str = "",
        source_config: dict = p["source"],
        generate_config: dict = p["generate"],
        validate_config: dict = p["validate"],
        filter_config: dict = p["filter"],
        split_config: dict = p["split"],
        tokenizer_config: dict = p["tokenizer"],
        model_config: dict = p["model"],
        train_config: dict = p["train"],
        reinforce_config: dict = p["reinforce"],
        finetune_config: dict = p["finetune"],
        evaluate_config: dict = p["evaluate"],
        distill_config: dict = p["distill"],
        quantize_config: dict = p["quantize"],
        serve_config: dict = p["serve"],
        registry_config: dict = p["registry"],
    ):
        ingest = data.ingest(source_uri=source_uri, source_config=source_config, generate_config=generate_config)
        ingest.set_display_name("ingest")
        validate = data.validate(raw=ingest.outputs["raw"], source_config=source_config,
                                 validate_config=validate_config)
        validate.set_display_name("validate")
        kept = data.filter_rows(clean=validate.outputs["clean"], filter_config=filter_config)
        kept.set_display_name("filter")
        split = data.split(kept=kept.outputs["kept"], split_config=split_config)
        split.set_display_name("split")
        base = training.train_base(splits=split.outputs["splits"], tokenizer_config=tokenizer_config,
                                   model_config=model_config, train_config=train_config)
        base.set_display_name("train base")
        reinforce = training.train_reinforce(base_model=base.outputs["model"], splits=split.outputs["splits"],
                                             reinforce_config=reinforce_config)
        reinforce.set_display_name("train reinforce (GRPO)")
        finetune = training.train_finetune(init_model=reinforce.outputs["model"], splits=split.outputs["splits"],
                                           finetune_config=finetune_config)
        finetune.set_display_name("train finetune")
        evaluation = training.evaluate_stages(base_model=base.outputs["model"],
                                              reinforce_model=reinforce.outputs["model"],
                                              finetune_model=finetune.outputs["model"],
                                              splits=split.outputs["splits"], evaluate_config=evaluate_config)
        evaluation.set_display_name("evaluate stages")
        student = compress.distill(teacher=finetune.outputs["model"], splits=split.outputs["splits"],
                                   distill_config=distill_config)
        student.set_display_name("distill")
        int8 = compress.quantize(float_model=student.outputs["model"], splits=split.outputs["splits"],
                                 quantize_config=quantize_config)
        int8.set_display_name("quantize (INT8)")
        repo = serve.serve_export(model=int8.outputs["model"], serve_config=serve_config)
        repo.set_display_name("serve.export (Triton repository)")
        checked = serve.serve_check(repository=repo.outputs["repository"], serve_config=serve_config)
        checked.set_display_name("serve.check (real tritonserver)")
        promoted = registry.promote(model=int8.outputs["model"], check=checked.outputs["check"],
                                    registry_config=registry_config)
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

    return distillery


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
        if name in DVC_TASKS and cluster.dvc_secret and cluster.dvc_secret_env:
            kubernetes.use_secret_as_env(task, secret_name=cluster.dvc_secret,
                                         secret_key_to_env=dict(cluster.dvc_secret_env))
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


def compile_pipeline(params: PipelineParams, out: str, on_cluster: bool = True) -> None:
    """Write the pipeline's IR YAML to `out`, with the cluster settings unless `on_cluster` is False."""
    compiler.Compiler().compile(build_pipeline(params, params.cluster if on_cluster else None), package_path=out)
