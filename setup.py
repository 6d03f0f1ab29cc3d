"""tokentrim: fused Triton kernels + a streamlined Wan2.1 AR rollout with TokenTrim."""

from setuptools import setup

setup(
    name="tokentrim",
    version="0.1.0",
    description="Fused Triton kernels for autoregressive long-video generation with TokenTrim drift pruning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tokentrim", "tokentrim.model", "tokentrim.rollout", "tokentrim.kernels"],
    package_dir={"tokentrim": "tokentrim", "tokentrim.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "einops",
        "numpy",
        "nvtx",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "numpy",
            "einops",
            "nvtx",
            "ruff",
            "setuptools>=64",
            "wheel",  # the offline install (pip --no-build-isolation) of bench/gpu_check.sh builds here
            "diffusers>=0.33",
        ],
        "video": [
            "diffusers>=0.33",
            "transformers>=4.45",
            "sentencepiece",
            "imageio",
            "imageio-ffmpeg",
            "av",
        ],
    },
    entry_points={"console_scripts": ["tokentrim=tokentrim.cli:main"]},
)
