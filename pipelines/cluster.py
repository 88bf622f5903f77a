"""Typed config of the cluster (the `cluster` section of params.yaml): where the compiled pipeline's
steps and the training job run on Kubernetes, and with what.

It is read at compile and render time only (`distillery compile`, `distillery submit`,
`distillery schedule`, `distillery render-job`): the settings become kfp-kubernetes platform
settings of the pipeline's tasks and the training job's pod template, not run parameters.
A local run (`distillery run`, kfp.local) ignores it.

    cluster:
      namespace: ml-team
      gpu_type: nvidia.com/gpu
      gpus_per_node: 8
      nodes: 2
      node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import ConfigError, require

PIPELINE_NAME = "distillery"
"""The Kubeflow pipeline's name (and the default experiment's); a local run's folders start with it."""
JOB_KINDS = ("PyTorchJob", "TrainJob")


@dataclass
class ClusterConfig:
    """Kubernetes settings of the pipeline's steps and of the distributed training job."""

    namespace: str = "distillery"
    """Namespace of the pipeline runs, the training job and the serving workloads."""
    image: str = ""
    """The component image; empty: components.image.IMAGE ($DISTILLERY_IMAGE at compile time), and
    for a training job that asks for GPUs its `-cuda` repository (Dockerfile.cuda): e.g.
    ghcr.io/distillery/distillery-cuda:0.1.0."""
    gpu_type: str = "nvidia.com/gpu"
    """Extended resource name of the accelerator that training steps request."""
    gpus_per_node: int = 8
    """Accelerators per training pod (one pod per node): the limit of the pipeline's train-base step
    (one training process per GPU, components/train/launch.py; the other GPU steps run one process
    and get one) and of each pod of the training job. 0 runs training on CPUs (none requested)."""
    nodes: int = 1
    """Training job: pods (nodes); processes = nodes * max(gpus_per_node, 1), which must be a
    multiple of train.pipeline_parallel * train.tensor_parallel."""
    cpu: str = "8"
    """CPU request (and limit) of a training pod."""
    memory: str = "64Gi"
    """Memory request (and limit) of a training pod."""
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    """Node labels a training pod must match (GPU nodes)."""
    tolerations: list[dict[str, str]] = field(default_factory=lambda: [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    """Tolerations of training pods (GPU nodes are usually tainted)."""
    checkpoint_pvc: str = "distillery-checkpoints"
    """PersistentVolumeClaim mounted at `checkpoint_mount` on training steps and the training job:
    checkpoints survive a pod's restart, so a retried step resumes."""
    checkpoint_mount: str = "/mnt/checkpoints"
    """Where the checkpoint volume is mounted."""
    registry_pvc: str = "distillery-registry"
    """PersistentVolumeClaim holding the model registry (a git repository) for registry.promote,
    mounted at `registry_mount`; registry.root should point under it on a cluster."""
    registry_mount: str = "/mnt/registry"
    """Where the registry volume is mounted."""
    hf_secret: str = "distillery-hf-token"
    """Secret whose key `token` becomes HF_TOKEN in train-base, for a `base_model` of hf://org/name
    that needs one (optional: a public model or a mounted path needs none)."""
    dvc_secret: str = "distillery-dvc-remote"
    """Secret holding the DVC remote's credentials, exposed as environment variables (never in
    the YAML): its keys map to variable names by `dvc_secret_env`."""
    dvc_secret_env: dict[str, str] = field(default_factory=lambda: {
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    """Secret key -> environment variable of the steps that read or write the DVC remote."""
    retries: int = 2
    """Retries of the steps that can flake (data ingest, training stages, serve.check); the others
    run once."""
    job_kind: str = "PyTorchJob"
    """What `distillery render-job` writes: PyTorchJob (Kubeflow Training Operator v1) or TrainJob
    (Kubeflow Trainer v2)."""

    def check(self) -> None:
        require(bool(self.namespace), "namespace: must not be empty")
        require(self.gpus_per_node >= 0, "gpus_per_node: must not be negative (0: CPU training)")
        require(self.nodes >= 1, "nodes: must be at least 1")
        require(self.retries >= 0, "retries: must not be negative")
        require(self.job_kind in JOB_KINDS, f"job_kind: {self.job_kind!r} is not one of {', '.join(JOB_KINDS)}")
        require(self.checkpoint_mount.startswith("/") and self.registry_mount.startswith("/"),
                "checkpoint_mount and registry_mount: must be absolute paths")

    def image_for(self, gpus: int) -> str:
        """`image`; else components.image.IMAGE, whose repository gets `-cuda` for a pod with GPUs:
        ghcr.io/distillery/distillery:0.1.0 -> ghcr.io/distillery/distillery-cuda:0.1.0, the
        Dockerfile.cuda build (a repository of its own rather than a tag suffix, so kustomize's
        `images:` can retag the CPU and CUDA images separately)."""
        from components import image as image_module

        if self.image:
            return self.image
        ref = image_module.IMAGE
        if gpus <= 0:
            return ref
        name, sep, _ = ref.partition("@")  # a digest pins the CPU build; it cannot name the CUDA one
        if sep:
            raise ConfigError(f"cluster.image: empty while $DISTILLERY_IMAGE is a digest ({ref}); give the CUDA "
                              f"image explicitly for pods with cluster.gpus_per_node > 0")
        slash, colon = name.rfind("/"), name.rfind(":")
        return f"{name[:colon]}-cuda{name[colon:]}" if colon > slash else f"{name}-cuda"

    @property
    def processes(self) -> int:
        """Training processes of the job: one per accelerator, or one per node on CPUs."""
        return self.nodes * max(self.gpus_per_node, 1)
