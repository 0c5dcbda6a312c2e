# syntax=docker/dockerfile:1.7
# KunServe images: one Dockerfile, three targets (docs/kubernetes.md, "Images").
#
#   control  the operator and every gateway; the project without torch (~250 MB)
#            docker build --target control -t kunserve-control:0.1.0 .
#   cpu      agents on CPU, with the torch CPU wheel
#            docker build --target cpu -t kunserve:0.1.0 .
#   cuda     agents on NVIDIA GPUs, with torch's CUDA wheel (the CUDA libraries come as pip wheels; the node's
#            driver comes in through the NVIDIA device plugin / container toolkit)
#            docker build --target cuda -t kunserve:0.1.0-cuda .
#
# Every image runs as uid/gid 10001 with HOME=/tmp, so pods can run with runAsNonRoot and a read-only root
# filesystem (/tmp an emptyDir). Checkpoints are not baked in: they come from a volume (ServingPool
# spec.model.source) — or add a stage `FROM kunserve:<tag>` that copies one to the path spec.model.path names.

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Empty: the default index, whose Linux x86_64 torch wheels are CUDA builds. Set it to pick a CUDA version.
ARG TORCH_CUDA_INDEX=

# ------------------------------------------------------------------------------------------------ base
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kunserve \
    PATH=/opt/kunserve/bin:$PATH \
    HOME=/tmp
RUN groupadd --system --gid 10001 kunserve \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kunserve \
 && python -m venv /opt/kunserve

# ----------------------------------------------------------------------- wheel (built once, for all)
FROM base AS wheel
WORKDIR /src
RUN pip install "hatchling>=1.25"
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY agent/ agent/
COPY gateway/ gateway/
COPY proto/ proto/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /dist . \
 && python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if re.split(r'[<>=!~ ;\[]', d)[0] != 'torch'))" > /dist/requirements-control.txt

# --------------------------------------------------------------------------------------------- control
FROM base AS control
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install -r /tmp/dist/requirements-control.txt \
 && pip install --no-deps /tmp/dist/kunserve-*.whl \
 && rm -rf /tmp/dist \
 && python -c "import kunserve.operator.handlers, kunserve.gateway.app"
USER 10001:10001
WORKDIR /tmp
CMD ["kunserve", "--help"]

# ------------------------------------------------------------------------------------------------- cpu
FROM base AS cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install /tmp/dist/kunserve-*.whl \
 && rm -rf /tmp/dist \
 && python -c "import torch, kunserve.agent.engine.llm_engine; assert not torch.version.cuda"
USER 10001:10001
WORKDIR /tmp
CMD ["kunserve", "agent", "--help"]

# ------------------------------------------------------------------------------------------------ cuda
FROM base AS cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
RUN pip install ${TORCH_CUDA_INDEX:+--index-url "$TORCH_CUDA_INDEX"} "torch==${TORCH_VERSION}"
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install /tmp/dist/kunserve-*.whl \
 && rm -rf /tmp/dist \
 && python -c "import torch, kunserve.agent.engine.llm_engine; assert torch.version.cuda, 'not a CUDA build of torch'"
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
CMD ["kunserve", "agent", "--help"]
