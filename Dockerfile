# quantsafe runner image: llama-cpp-python built with CUDA, CUDA torch, quantsafe with
# every extra, and the gate suite. For GitHub `container:` jobs on GPU runners:
#
#   jobs.gate.container: {image: ghcr.io/OWNER/quantsafe-runner:0.1.0, options: --gpus all}
#
# With QUANTSAFE_PREINSTALLED=/opt/quantsafe in the job env the action uses this environment.
# Build: docker build -t quantsafe-runner:0.1.0 .   (CUDA_ARCHITECTURES narrows the kernels)
# quantsafe is a screen, not a certificate: see docs/action.md.

ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=24.04

# --------------------------------------------------------------------------- build stage
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build

ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ARG CUDA_ARCHITECTURES="75;80;86;89;90"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's archive replaces package versions with security updates, so apt packages are
# not pinned (DL3008, .hadolint.yaml); the base image tag and every Python package are.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential cmake git python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/build
ENV PATH=/opt/build/bin:$PATH

# llama.cpp links against the CUDA driver stub at build time; the host driver is used at run time.
RUN CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-cache-dir --no-deps -w /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

COPY pyproject.toml README.md LICENSE /src/
COPY scripts/constraints.txt /src/scripts/constraints.txt
COPY pytest_quantsafe /src/pytest_quantsafe
RUN pip wheel --no-cache-dir --no-deps -w /wheels /src

# --------------------------------------------------------------------------- runtime stage
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

LABEL org.opencontainers.image.title="quantsafe-runner" \
      org.opencontainers.image.description="quantsafe refusal-drift release gate with CUDA engines (a screen, not a certificate)" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# git and gh for checkout and release uploads; python3 for the gate; libgomp for llama.cpp.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gh git git-lfs libgomp1 python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

COPY --from=build /wheels /wheels
COPY scripts/constraints.txt /wheels/constraints.txt
# The Linux torch wheels on PyPI are CUDA builds; torch stays pinned (scripts/constraints.txt).
RUN python3 -m venv /opt/quantsafe \
    && /opt/quantsafe/bin/pip install --no-cache-dir /wheels/llama_cpp_python-*.whl \
    && /opt/quantsafe/bin/pip install --no-cache-dir -c /wheels/constraints.txt \
        "$(ls /wheels/pytest_quantsafe-*.whl)[all]" \
    && rm -rf /wheels

COPY gate /opt/quantsafe-action/gate

ENV PATH=/opt/quantsafe/bin:$PATH \
    QUANTSAFE_PREINSTALLED=/opt/quantsafe \
    OMP_WAIT_POLICY=PASSIVE \
    PYTHONDONTWRITEBYTECODE=1

RUN python -c "import pytest_quantsafe, llama_cpp, torch; print('quantsafe', pytest_quantsafe.__version__, 'llama_cpp', llama_cpp.__version__, 'torch', torch.__version__)"

CMD ["quantsafe", "--help"]
