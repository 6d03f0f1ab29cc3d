"""Test setup: on machines without CUDA, run Triton kernels through the interpreter.

TRITON_INTERPRET must be set before triton (and the kernel modules) are imported, so it is set
here, at collection time, before any test module imports tokentrim.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def model():
    """The tiny random Wan model (``WanConfig.preset("tiny")``, seed 0, eval mode), one per test module."""
    from tokentrim.model import WanConfig, WanModel

    torch.manual_seed(0)
    return WanModel(WanConfig.preset("tiny")).eval()


@pytest.fixture(scope="module")
def text():
    """Text embeddings [2, 8, 64] f32 for the tiny model (seed 1), one per test module."""
    return torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
