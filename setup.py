"""megatron-deft: token-level SFT objectives, exact under tensor parallelism, on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-deft",
    version="0.1.0",
    description=(
        "Megatron-Core SFT trainer with vocab-parallel token-level objectives "
        "(DEFT, Cayley, EAFT, DFT, Tsallis-q, p, NLL)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_deft", "megatron_deft.*"]),
    # Pinned to the versions the test suite runs against (see .ci/run).
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "numpy>=1.26",
        "packaging",
        "psutil>=5.9",  # megatron-core dist_checkpointing's async writer needs it (else saves hang)
        "pyarrow>=15",  # Parquet input (.parquet data files), as `datasets` writes them
        "math-verify==0.9.0",  # math answer equivalence (megatron_deft/evaluation/math_grading.py)
        "pyyaml>=6.0",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "transformers>=4.45",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "matplotlib>=3.8", "ruff==0.17.6"],
        "plots": ["matplotlib>=3.8"],
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "megatron-deft-train=megatron_deft.train:main",
            "megatron-deft-eval=megatron_deft.eval:main",
        ],
    },
)
