"""fuxi-pretrain: multilingual LLM pretraining (FuxiTranyu, MoE-LPR, PreAlign, GhostRNN)."""
import sys

from setuptools import find_packages, setup

# One import namespace, the folders kept at the repository root: `model/` is imported as `fuxi.model`, and so on.
# Generic top-level names (`kernels`, `model`, `launch`) collide with other distributions (transformers >= 5.25
# requires Hugging Face's `kernels`); `fuxi` is the only top-level name this package installs.
FOLDERS = ["common", "model", "kernels", "data_pipeline", "pretrain", "checkpoints", "launch", "experiments"]
package_dir = {f"fuxi.{folder}": folder for folder in FOLDERS}
packages = [f"fuxi.{folder}{'.' + sub if sub else ''}" for folder in FOLDERS
            for sub in ["", *find_packages(folder)]]

# torch is left unpinned on purpose: GPU users install the torch build for their CUDA first; on a CPU-only
# machine the Makefile installs torch==2.13.0 (the CPU wheel) before this package so pip keeps it.
install_requires = [
    "torch>=2.4",
    "numpy>=1.24",
    "deepspeed>=0.15",
    "webdataset>=0.2.90",
    "tokenizers>=0.19",
    "sentencepiece>=0.2",
    "transformers>=4.57",  # checked on 4.57.x and the newest release by `make test-compat`
    "safetensors>=0.4",
    "pyyaml>=6",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    # the data engine: executors (local, Slurm, Ray), completion markers, per-task stats; its MinHash stage
    # (used side by side in `fuxi bench data --scale`) fails with xxhash 4
    "datatrove>=0.9,<0.11",  # 0.9: huggingface_hub < 1 (transformers 4.x); 0.10: hub >= 1.6 (transformers 5)
    "xxhash>=3.0,<4",
    "orjson>=3.9",  # datatrove's JSONL reader (the datatrove side of `fuxi bench data --scale`)
    "py3langid>=0.2.2",
    # corpora as they ship (data_pipeline/readers.py): parquet and `datasets` folders (CulturaX, FineWeb-2),
    # .jsonl.zst (Dolma, RedPajama)
    "pyarrow>=14",
    "zstandard>=0.22",
    "tiktoken>=0.7",  # data_pipeline/encoders.py: 3x faster packing, checked equal to the HF tokenizer
    "tensorboard>=2.14",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="fuxi-pretrain",
    version="0.1.0",
    description="Pretraining codebase for multilingual LLMs: FuxiTranyu, MoE-LPR, PreAlign, GhostRNN",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # PYTHONSAFEPATH (the checkout root off sys.path) is 3.11's
    packages=packages,
    package_dir=package_dir,
    package_data={"fuxi.checkpoints": ["hf_files/*.py"], "fuxi.data_pipeline": ["corpus/*", "corpus/**/*"],
                  "fuxi.pretrain.evaluation": ["tasks/*", "tasks/**/*"]},
    install_requires=install_requires,
    extras_require={
        # tests: a local S3 server (moto's server mode, S3 only) for the s3:// paths of the data stages
        # and `save_to_disk` folders (datasets; reading them needs only pyarrow); ray: the tests run
        # `fuxi data ... --executor ray` on a local Ray cluster (tests/test_data_ray.py)
        "dev": ["pytest>=7", "pytest-xdist>=3", "pytest-timeout>=2", "moto[s3]>=5.0", "flask>=3", "flask-cors>=4",
                "s3fs>=2024.6", "datasets>=2.14", "ray>=2.40"],
        "s3": ["s3fs>=2024.6"],  # s3:// inputs and outputs of the data stages (data_pipeline/remote.py)
        "flash": ["flash-attn>=2.5"],
        # `fuxi eval` and in-loop evaluation: lm-evaluation-harness with its Hugging Face backend (accelerate);
        # the task-loading API used here (TaskManager.load) is that of 0.4.13.
        "eval": ["lm-eval[hf]>=0.4.13,<0.5"],
        "ray": ["ray>=2.40"],  # `fuxi data ... --executor ray`; pinned (2.60.0) in constraints.txt
    },
    entry_points={"console_scripts": ["fuxi=fuxi.launch.cli:main"]},
)
