# syntax=docker/dockerfile:1
# The GPU worker image: Ray head and GPU workers, job drivers, the distillation stages.
#   docker build -f docker/gpu.Dockerfile -t sea-convert-gpu:0.1.0 .
# CUDA comes as the runtime wheels torch pins (nvidia-cuda-runtime, cudnn, nccl, ... CUDA 13.0,
# see requirements/lock-gpu.txt); the host brings the driver (>= 580) through the NVIDIA container
# toolkit. Triton ships its own ptxas but builds its launcher with the system C compiler, so the
# runtime stage keeps gcc.

FROM python:3.11.14-slim-bookworm AS build
WORKDIR /opt/sea-convert
COPY requirements/lock-gpu.txt requirements/
COPY docker/install.sh docker/
COPY pyproject.toml README.md ./
COPY sea_convert/ sea_convert/
COPY kernels/ kernels/
COPY workers/ workers/
COPY api/ api/
COPY recipes/ recipes/
RUN bash docker/install.sh gpu /opt/venv

FROM python:3.11.14-slim-bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /bin/bash sea
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/sea-convert /opt/sea-convert
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    TRITON_CACHE_DIR=/home/sea/.triton \
    HF_HOME=/home/sea/.cache/huggingface
USER 1000
WORKDIR /opt/sea-convert
# KubeRay and the cluster launcher replace the command with `ray start ...`
CMD ["ray", "start", "--head", "--block", "--dashboard-host=0.0.0.0"]
