"""Packaging for llp-pretrain: the ``llp_pretrain`` training stack and the ``data_prep`` tools.

Install torch first (``pip install torch==2.13.0`` for the CPU wheel, or your CUDA build), then
``pip install -e .[test]``. torch is declared as a range so an existing CUDA build is kept.
"""
from setuptools import find_packages, setup

EVAL = ["transformers>=5.24,<6", "lm-eval[hf]>=0.4.13,<0.5", "protobuf>=3.20"]

setup(
    name="llp-pretrain",
    version="0.1.0",
    description="Pretraining stack for Long LoRA Perceiver (LLP) language models: data prep, "
    "DeepSpeed ZeRO training, sequence parallelism, evaluation and launchers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["llp_pretrain", "llp_pretrain.*", "data_prep", "data_prep.*"])
    + ["llp_pretrain.configs"],
    # the run configs ship inside the package (found by llp_pretrain.config.configs_dir when installed)
    package_dir={"llp_pretrain.configs": "configs"},
    package_data={
        "data_prep": ["data/kjv.txt.gz", "data/README.md"],
        "llp_pretrain.configs": ["*.yaml", "deepspeed/*.json", "compare/*.yaml"],
        "llp_pretrain.hf": ["remote/*.py"],
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.5",  # SDPA enable_gqa (grouped-query attention, n_kv_heads)
        "deepspeed>=0.14",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "webdataset>=0.2.86",
        "tensorboard>=2.14",
        "pydantic>=2.5",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "zstandard>=0.21",
        "pyarrow>=14",
    ],
    extras_require={
        # `llp-pretrain export --format hf` and `llp-pretrain harness` (docs/huggingface.md); the
        # exported code targets the transformers 5 API (Cache objects passed as `cache=`)
        "eval": EVAL,
        # the suite tests the transformers export and the harness too, so it needs EVAL
        "test": ["pytest>=7.4", "pytest-timeout>=2.2", "pillow>=9"] + EVAL,
    },
    entry_points={
        "console_scripts": [
            "llp-prep=data_prep.cli:main",
            "llp-pretrain=llp_pretrain.cli:main",
        ]
    },
)
