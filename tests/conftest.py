"""Test configuration: GPU tests (marked `gpu`) are skipped unless CUDA and the CUDA kernels are available; the suite
runs offline, so transformers' Hub kernels (from_pretrained kernelizes layers with code downloaded from the Hub by
default since 5.25) are off unless the environment says otherwise."""
import os

import pytest
import torch

os.environ.setdefault("USE_HUB_KERNELS", "0")


def _cuda_kernels_available() -> bool:
    if not torch.cuda.is_available():
        return False
    import flashcore_hf

    return flashcore_hf.HAS_CUDA_KERNELS


def pytest_collection_modifyitems(config, items):
    if _cuda_kernels_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and flashcore built with CUDA kernels")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator():
    """A fresh, randomly seeded generator per test (inputs differ between runs; the seed is printed on failure)."""
    seed = torch.seed() % (2**31)
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)
