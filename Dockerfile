# megatron-deft on the NGC PyTorch container. Build from the repository root:
#     docker build -t megatron-deft .
# Running it on one node, several nodes and Slurm (pyxis/enroot): docker/README.md.
#
# The base image ships CUDA, cuDNN, NCCL, a PyTorch built against them, Transformer Engine,
# apex and flash-attn (NVIDIA's release notes for the tag list the exact versions). This file
# adds only what the image lacks and never reinstalls torch.
#
# 25.12 (CUDA 13.1, PyTorch 2.10 pre-release, Python 3.12) is chosen to sit inside the range
# megatron-core 0.16.1 is tested with: its `dev` extra asks for transformer-engine >=2.9,<2.12 on
# CUDA 13. A newer tag may ship a Transformer Engine outside that range; pick one with
#     docker build --build-arg NGC_PYTORCH_TAG=<yy.mm>-py3 -t megatron-deft .
ARG NGC_PYTORCH_TAG=25.12-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}

# Caches go where any user can write, so `docker run --user $(id -u):$(id -g)` works too.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLCONFIGDIR=/tmp/.cache/matplotlib

WORKDIR /opt/megatron-deft

# Dependencies in their own layer, so editing the source does not reinstall them.
# The image pins its packages through PIP_CONSTRAINT (/etc/pip/constraint.txt), which may not
# admit megatron-core 0.16.1 or transformers 5, so it is lifted for this step only (as
# megatron-core's install guide does). megatron-core goes in with --no-deps: its only
# requirements (torch, numpy, packaging) are already here and torch must stay NGC's build. The
# others do not depend on torch; the last command fails the build if torch changed anyway.
RUN python -c "import torch; print(torch.__version__)" > /tmp/ngc-torch-version \
 && PIP_CONSTRAINT= pip install --no-deps "megatron-core==0.16.1" \
 && PIP_CONSTRAINT= pip install "sentencepiece>=0.2" "tensorboard>=2.15" "transformers>=4.45" \
        "safetensors>=0.4" "psutil>=5.9" "pyyaml>=6.0" \
 && python -c "import torch, sys; \
expected = open('/tmp/ngc-torch-version').read().strip(); \
sys.exit(torch.__version__ != expected and f'torch changed: {expected} -> {torch.__version__}')"

COPY . .
# --no-deps: setup.py pins torch==2.13.0 for the CPU test machines; here NGC's torch is the one.
RUN pip install --no-deps -e . \
 && python -m compileall -q megatron_deft \
 && chmod -R a+rX /opt/megatron-deft \
 && python -m megatron_deft.train --help > /dev/null \
 && python -c "import importlib.util as u; \
print('optional GPU libraries:', {m: u.find_spec(m) is not None \
for m in ('transformer_engine', 'apex', 'flash_attn')})"

CMD ["python", "-m", "megatron_deft.train", "--help"]
