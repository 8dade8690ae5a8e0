"""Every fact flashcore relies on that depends on the installed transformers release, in one place.

- The tested range: CI runs the whole suite on the newest release pip installs and the transformers tests again on
  TESTED_MIN (the floor pyproject.toml states); the GPU machine runs TESTED_MIN. Outside that range the package
  warns once and keeps working wherever the patches' signature checks pass (patches/targets.py): a newer release is
  never an error by itself.
- Feature facts, detected from the installed code where transformers exposes them, else from its version:
  `CACHE_KWARG` (the name generate() and the models use for the cache) and `POSITIVE_CROP_IS_LENGTH`.
"""
from __future__ import annotations

import inspect
import warnings

from packaging.version import Version

TESTED_MIN = Version("5.17.0")
"""Oldest transformers release CI and the GPU machine run (pyproject.toml's floor)."""
TESTED_MAX = Version("5.25.0")
"""Newest transformers release the suite ran against (later patch releases of its minor count as tested)."""
SUPPORTED_MIN = Version("5.0.0")
"""Before 5.0 the Cache and attention-function APIs differ (cache_position, 4.x layer signatures): refused."""


class UntestedTransformersWarning(UserWarning):
    """transformers is newer or older than the range the suite ran against."""


def installed_version() -> Version:
    import transformers

    return Version(transformers.__version__)


def check_transformers_version(version: str) -> Version:
    """Refuse transformers < 5.0 (ImportError); warn outside [TESTED_MIN, TESTED_MAX.x]; return the version."""
    parsed = Version(version)
    release = Version(parsed.base_version)
    if release < SUPPORTED_MIN:
        raise ImportError(
            f"flashcore_hf needs transformers >= {SUPPORTED_MIN} (the Cache / attention-function API of 5.x); "
            f"found {version}. Upgrade with `pip install -U 'transformers>={TESTED_MIN}'`.")
    if release < TESTED_MIN or release.release[:2] > TESTED_MAX.release[:2]:
        warnings.warn(
            f"flashcore_hf was tested with transformers {TESTED_MIN}..{TESTED_MAX.major}.{TESTED_MAX.minor}.x; "
            f"found {version}. The patches check the functions they wrap and report a changed one when a model "
            "asks for attn_implementation='flashcore'; other behaviour may differ: run the test suite against it.",
            UntestedTransformersWarning, stacklevel=3)
    return parsed


def _cache_kwarg() -> str:
    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


CACHE_KWARG: str = _cache_kwarg()
"""The keyword under which generate() keeps the cache, models take it (`model(ids, cache=...)`) and outputs return it:
"cache" from transformers 5.24 (where `past_key_values` is deprecated), "past_key_values" before."""

POSITIVE_CROP_IS_LENGTH: bool = installed_version().release < (5, 18)
"""transformers < 5.18 reads a positive `Cache.crop` argument as the length to keep (deprecated); later versions
refuse it."""
