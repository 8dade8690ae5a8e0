"""Loads the compiled extension `flashcore_hf._C`, which registers the `flashcore` op library."""
from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries)

try:
    from . import _C  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "flashcore_hf._C is not built. Build it from the repository root with\n"
        "    pip install --no-build-isolation -e .\n"
        "(torch must already be installed; set FLASHCORE_FORCE_CPU=1 to skip the CUDA kernels). "
        f"Original error: {err}"
    ) from err

HAS_CUDA_KERNELS: bool = bool(torch.ops.flashcore.has_cuda_kernels())
