# Production image: NGC PyTorch ships CUDA, NCCL, cuDNN, Transformer Engine and apex, so the package
# is installed on top without touching torch (setup.py deliberately does not pin it).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/megatron_phi4
COPY setup.py README.md ./
COPY megatron_phi4 ./megatron_phi4
COPY tools ./tools
COPY examples ./examples
RUN pip install --no-cache-dir -e ".[test]" \
    && python -c "import megatron_phi4, tiktoken_ext; from megatron_phi4.tokenizer import Phi4Tokenizer; Phi4Tokenizer()"

ENV OMP_NUM_THREADS=8
ENTRYPOINT ["torchrun"]
CMD ["--nproc-per-node", "8", "-m", "megatron_phi4.train", "--config", "examples/recipes/phi4_14b.yaml"]
