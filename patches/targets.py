"""The check every patch makes before wrapping a transformers function: it exists and has the expected signature."""
from __future__ import annotations

import inspect


def checked_target(owner, attr: str, expected_parameters: tuple[str, ...], qualified_name: str, patch_file: str,
                   missing_message: str):
    """owner.attr if it exists with exactly `expected_parameters`; RuntimeError naming the patch to revisit if not.

    missing_message: what to say when the attribute is gone (e.g. "transformers.modeling_utils no longer imports
    is_flash_attention_requested").
    """
    target = getattr(owner, attr, None)
    if target is None:
        raise RuntimeError(f"{missing_message}; the flashcore patch in {patch_file} must be revisited for this "
                           "transformers version.")
    params = tuple(inspect.signature(target).parameters)
    if params != expected_parameters:
        raise RuntimeError(f"{qualified_name}{params} changed signature (expected {expected_parameters}); the "
                           f"flashcore patch in {patch_file} must be revisited.")
    return target
