"""Which transformers releases the patches were written against, and what happens outside that range."""
from __future__ import annotations

import warnings

from packaging.version import Version

TESTED_MIN = Version("5.17.0")
"""Oldest transformers release the patches were checked against."""
TESTED_MAX = Version("5.23.0")
"""Newest transformers release the patches were checked against (later 5.23.x patch releases count as tested)."""
SUPPORTED_MIN = Version("5.0.0")
"""Before 5.0 the Cache and attention-function APIs differ (cache_position, 4.x layer signatures): refused."""


class UntestedTransformersWarning(UserWarning):
    """transformers is newer or older than the range the patches were checked against."""


def check_transformers_version(version: str) -> Version:
    """Refuse transformers < 5.0 (ImportError); warn once outside [TESTED_MIN, TESTED_MAX.x]; return the version."""
    parsed = Version(version)
    release = Version(parsed.base_version)
    if release < SUPPORTED_MIN:
        raise ImportError(
            f"flashcore_hf needs transformers >= {SUPPORTED_MIN} (the Cache / attention-function API of 5.x); "
            f"found {version}. Upgrade with `pip install -U 'transformers>={TESTED_MIN}'`.")
    if release < TESTED_MIN or release.release[:2] > TESTED_MAX.release[:2]:
        warnings.warn(
            f"flashcore_hf was tested with transformers {TESTED_MIN}..{TESTED_MAX.major}.{TESTED_MAX.minor}.x; "
            f"found {version}. The patches check the functions they wrap and refuse to apply if those changed, "
            "but other behaviour may differ: run tests/test_hf_patches.py against this version.",
            UntestedTransformersWarning, stacklevel=3)
    return parsed
