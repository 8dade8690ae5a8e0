"""Test configuration: GPU tests (marked `gpu`) are skipped unless CUDA and the CUDA kernels are available."""
import pytest
import torch


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
