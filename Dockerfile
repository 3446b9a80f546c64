# tinyserve's OpenAI-compatible server on an NVIDIA GPU, for a model folder mounted at /model.
#
#   docker build -t tinyserve .
#   docker run --gpus all -p 8000:8000 -v /path/to/awq-model:/model:ro tinyserve [extra serve flags, e.g. --api-key KEY]
#
# Python 3.11 (the lock's interpreter) with the CUDA lock: torch, triton and the nvidia-* runtime wheels pinned by
# hash, the same set scripts/setup installs on a GPU machine. The host needs an NVIDIA driver for CUDA 13.
FROM python:3.11-slim-bookworm

# Triton builds a small C launcher the first time it runs a kernel, so the image needs a C compiler.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tinyserve
COPY requirements/lock-cuda.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/lock-cuda.txt
COPY pyproject.toml README.md ./
COPY tinyserve_kernels tinyserve_kernels
COPY tinyserve_quantize tinyserve_quantize
COPY tinyserve tinyserve
RUN pip install --no-cache-dir --no-deps --no-build-isolation .

RUN useradd --create-home --uid 1000 tinyserve
USER tinyserve
EXPOSE 8000
# /health answers 503 while the model loads (and Triton autotunes), 200 once requests are served.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# SIGTERM (docker stop) drains running requests for --shutdown-timeout seconds; give docker stop at least as long
# (docker stop -t 35) or lower --shutdown-timeout.
ENTRYPOINT ["python", "-m", "tinyserve", "serve", "--host", "0.0.0.0", "--port", "8000", "--model", "/model"]
CMD []
