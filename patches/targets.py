"""How every patch wraps a transformers function: check it first, wrap it, and be able to put it back.

A patch only wraps a function that exists with exactly the parameters it was written against. When a transformers
release changed that function, the patch does not apply and `import flashcore_hf` still works: a tripwire wraps the
changed function instead and raises `PatchTargetChanged` (naming the function and the patch to revisit) only on the
calls that concern flashcore (a model that asks for attn_implementation="flashcore"); every other call goes to
transformers' function untouched.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable


class PatchTargetChanged(RuntimeError):
    """A transformers function a flashcore patch wraps is gone or has a different signature in this release."""


def checked_target(owner, attr: str, expected_parameters: tuple[str, ...], qualified_name: str, patch_file: str):
    """owner.attr if it exists with exactly `expected_parameters`; PatchTargetChanged naming the patch if not."""
    target = getattr(owner, attr, None)
    if target is None:
        raise PatchTargetChanged(f"{qualified_name} is gone in this transformers release; the flashcore patch in "
                                 f"{patch_file} must be revisited before attn_implementation='flashcore' can be used.")
    params = tuple(inspect.signature(target).parameters)
    if params != expected_parameters:
        raise PatchTargetChanged(f"{qualified_name}{params} changed signature (expected {expected_parameters}); the "
                                 f"flashcore patch in {patch_file} must be revisited before attn_implementation="
                                 "'flashcore' can be used.")
    return target


def install(owner, attr: str, wrapper, original) -> None:
    """Replace owner.attr by `wrapper`, remembering `original` so that `restore` can put it back (for a static
    method: wrapper a staticmethod, original the staticmethod object it replaces)."""
    function = wrapper.__func__ if isinstance(wrapper, staticmethod) else wrapper
    function.__flashcore_original__ = original
    setattr(owner, attr, wrapper)


def restore(owner, attr: str) -> bool:
    """Put back the function `install` replaced; False when owner.attr is not one of ours."""
    current = getattr(owner, attr, None)
    original = getattr(current, "__flashcore_original__", None)
    if original is None:
        return False
    setattr(owner, attr, original)
    return True


def install_tripwire(owner, attr: str, concerns_flashcore: Callable[..., bool], error: PatchTargetChanged) -> None:
    """Wrap a changed owner.attr so that calls for which concerns_flashcore(*args, **kwargs) is true raise `error`;
    others run transformers' function unchanged. Nothing happens when owner.attr is gone."""
    original = getattr(owner, attr, None)
    if original is None or hasattr(original, "__flashcore_original__"):
        return

    @functools.wraps(original)
    def tripwire(*args, **kwargs):
        if concerns_flashcore(*args, **kwargs):
            raise error
        return original(*args, **kwargs)

    install(owner, attr, tripwire, original)
