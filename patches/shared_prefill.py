"""Prefill each distinct prompt of a generate() batch once.

`num_return_sequences`, beam search and sampling several answers to one prompt all expand the prompt into identical
rows before the prefill, and a user's batch may repeat prompts too; transformers then runs the whole model over every
copy (128 samples of a 2K prompt: 128 prefills). This patch wraps `GenerationMixin._prefill`: when a hook says the
call's cache can share rows, the prefill runs on the distinct rows only (same token ids, attention mask and position
ids) and the hook's callback turns the cache's rows back into the full batch (flashcore: the copies share the
prompt's pages by reference count); the prefill's outputs are expanded to the full batch the same way. Everything
else (no hook answer, a first iteration of an assistant, inputs_embeds or any model input the patch does not know,
a batch without repeats) goes to the original method untouched.

The patch only saves work, so a release where `_prefill` changed leaves it out (recorded in
`flashcore_hf.patches.failures()`): generate() stays correct, the prefill just runs on every row.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .targets import checked_target, install
from .versions import CACHE_KWARG

EXPECTED_PARAMETERS = ("self", "input_ids", "generation_config", "model_kwargs", "is_first_iteration")
"""Signature of `GenerationMixin._prefill` the patch was written against (patches/versions.py: tested range)."""

ROW_KWARGS = ("attention_mask", "position_ids", "token_type_ids")
"""Model inputs with one row per batch row: part of what makes two rows identical, cut to the distinct rows."""
SHARED_KWARGS = frozenset({CACHE_KWARG, "use_cache", "logits_to_keep", "output_attentions", "output_hidden_states",
                           "return_dict", "cache_position"})
"""Model inputs that are the same for every row (passed through as they are)."""

RowSharingHook = Callable[..., Callable[[list[int]], None] | None]
"""hook(model, model_kwargs) -> expand(row_of_each_batch_row) or None: whether this prefill may run on the distinct
rows; expand(rows) then makes the cache's rows the full batch (batch row i = distinct row rows[i])."""


def distinct_rows(input_ids: torch.Tensor, model_kwargs: dict) -> tuple[list[int], list[int]]:
    """(first batch row of each distinct row, the distinct row of every batch row): rows are equal when their token
    ids and every ROW_KWARGS input are. One host copy of the inputs."""
    parts = [input_ids] + [model_kwargs[k] for k in ROW_KWARGS if isinstance(model_kwargs.get(k), torch.Tensor)]
    host = [p.detach().reshape(p.shape[0], -1).cpu() for p in parts]
    first: dict[bytes, int] = {}
    unique, inverse = [], []
    for row in range(input_ids.shape[0]):
        key = b"".join(h[row].numpy().tobytes() for h in host)
        index = first.get(key)
        if index is None:
            index = first[key] = len(unique)
            unique.append(row)
        inverse.append(index)
    return unique, inverse


def _expand_output(value, index: torch.Tensor, rows: int):
    """A prefill output with `rows` leading rows, indexed to the full batch (tensors and tuples of them)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, tuple):
        return tuple(_expand_output(v, index, rows) for v in value)
    return value


def install_shared_prefill(hook: RowSharingHook) -> None:
    """Route generate()'s prefill through the row-sharing wrapper (idempotent: a later call replaces the hook).
    Raises PatchTargetChanged if `_prefill` changed."""
    from transformers.generation.utils import GenerationMixin

    current = GenerationMixin._prefill
    holder = getattr(current, "__flashcore_hook__", None)
    if holder is not None:
        holder[0] = hook
        return
    original = checked_target(GenerationMixin, "_prefill", EXPECTED_PARAMETERS, "GenerationMixin._prefill",
                              "patches/shared_prefill.py")
    holder = [hook]

    @functools.wraps(original)
    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True):
        expand = None
        known = all(k in SHARED_KWARGS or k in ROW_KWARGS or v is None for k, v in model_kwargs.items())
        if is_first_iteration and known and isinstance(input_ids, torch.Tensor) and input_ids.shape[0] > 1:
            expand = holder[0](self, model_kwargs)
        if expand is None:
            return original(self, input_ids, generation_config, model_kwargs, is_first_iteration)
        unique, inverse = distinct_rows(input_ids, model_kwargs)
        if len(unique) == input_ids.shape[0]:
            return original(self, input_ids, generation_config, model_kwargs, is_first_iteration)
        pick = torch.tensor(unique, dtype=torch.long)
        sub_kwargs = {k: v.index_select(0, pick.to(v.device)) if k in ROW_KWARGS and isinstance(v, torch.Tensor)
                      else v for k, v in model_kwargs.items()}
        outputs = original(self, input_ids.index_select(0, pick.to(input_ids.device)), generation_config,
                           sub_kwargs, is_first_iteration)
        expand(inverse)
        index = torch.tensor(inverse, dtype=torch.long)
        for key in list(outputs.keys()):
            outputs[key] = _expand_output(outputs[key], index, len(unique))
        return outputs

    _prefill.__flashcore_hook__ = holder
    install(GenerationMixin, "_prefill", _prefill, original)
