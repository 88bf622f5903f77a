# syntax=docker/dockerfile:1
# The suite's own image, CPU variant: every Kubeflow component runs in it (components/image.py
# names it), and so do the Triton Deployment (`distillery serve`) and CPU training jobs.
#   docker build -t ghcr.io/distillery/distillery:0.1.0 .
# The CUDA variant, for GPU training jobs, is Dockerfile.cuda (ghcr.io/distillery/distillery-cuda).
# tests/manifests/test_dockerfiles.py parses both and checks what they must keep.
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GX_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    DS_ACCELERATOR=cpu \
    DISTILLERY_PARAMS=/opt/distillery/params.yaml

# git for the GTO registry (tags) and DVC; a compiler for DeepSpeed's just-in-time CPU ops
RUN apt-get update && apt-get install -y --no-install-recommends git build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distillery
COPY pyproject.toml constraints.txt README.md params.yaml ./
COPY components/ components/
COPY pipelines/ pipelines/
COPY kernels/ kernels/

# the same order as the Makefile: torch's CPU build, deepspeed without build isolation, the suite
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -c constraints.txt --no-build-isolation deepspeed \
    && pip install -c constraints.txt .

# Non-root (uid/gid 10001, the manifests' runAsUser), as Pod Security "restricted" asks. The KFP
# v2 launcher must then not need to write at the filesystem root: use a Kubeflow Pipelines backend
# with kubeflow/pipelines#10538 (non-root launcher).
RUN groupadd --gid 10001 distillery && useradd --uid 10001 --gid 10001 --create-home distillery
USER 10001:10001
ENTRYPOINT ["distillery"]
