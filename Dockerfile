# The suite's own image: every Kubeflow component runs in it (components/image.py names it).
#   docker build -t ghcr.io/distillery/distillery:0.1.0 .
# CPU variant; a CUDA variant arrives with the scale-out work (torch from the CUDA index).
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GX_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    DS_ACCELERATOR=cpu \
    DISTILLERY_PARAMS=/opt/distillery/params.yaml

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

# Non-root, as Pod Security "restricted" asks. The KFP v2 launcher must then not need to write at
# the filesystem root: use a Kubeflow Pipelines backend with kubeflow/pipelines#10538 (non-root
# launcher), or drop these two lines for older backends.
RUN useradd --uid 10001 --create-home distillery
USER 10001
ENTRYPOINT ["distillery"]
