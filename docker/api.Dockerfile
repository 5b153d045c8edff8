# syntax=docker/dockerfile:1
# The API image: REST service, job store, scheduler; it submits jobs to a Ray cluster
# (SEA_CONVERT_RAY_ADDRESS) and never runs model code, so it carries no torch.
#   docker build -f docker/api.Dockerfile -t sea-convert-api:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build
WORKDIR /opt/sea-convert
COPY requirements/lock-api.txt requirements/
COPY docker/install.sh docker/
COPY pyproject.toml README.md ./
COPY sea_convert/ sea_convert/
COPY kernels/ kernels/
COPY workers/ workers/
COPY api/ api/
COPY recipes/ recipes/
RUN bash docker/install.sh api /opt/venv

FROM python:3.11.14-slim-bookworm
RUN useradd --create-home --uid 1000 --shell /bin/bash sea \
    && mkdir -p /data && chown sea:sea /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/sea-convert /opt/sea-convert
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SEA_CONVERT_OUTPUT_ROOT=/data/outputs \
    SEA_CONVERT_STATE_DIR=/data/state
USER 1000
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["sea-convert", "serve", "--host", "0.0.0.0", "--port", "8000"]
