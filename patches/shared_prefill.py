"""Prefill each distinct prompt of a generate() batch once, and only what a cache already holds not.

`num_return_sequences`, beam search and sampling several answers to one prompt all expand the prompt into identical
rows before the prefill, and a user's batch may repeat prompts too; transformers then runs the whole model over every
copy (128 samples of a 2K prompt: 128 prefills). This patch wraps `GenerationMixin._prefill` and asks a hook for
`PrefillHooks`; with them
  - share_rows: the prefill runs on the distinct rows only (same token ids, attention mask and position ids), and
    the prefill's outputs are expanded back to the full batch;
  - before(input_ids, model_kwargs) -> columns: runs first on the rows that are prefilled and returns how many
    leading columns the cache holds now (flashcore: copies in the pages of a prompt prefix kept from earlier calls);
    the prefill then gets only the columns after them (the attention mask and position ids keep their full length,
    as when generate() continues from a cache that holds tokens);
  - after(input_ids, model_kwargs, rows): runs after the prefill (flashcore: keeps the prompt's pages for later
    calls, and with shared rows makes the cache's rows the full batch, batch row i = distinct row rows[i]).
Everything else (no hooks, a later iteration of an assistant, inputs_embeds or any model input the patch does not
know) goes to the original method untouched.

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

class PrefillHooks:
    """What a hook returns for one prefill (see the module docstring); the defaults do nothing."""

    share_rows = False

    def before(self, input_ids: torch.Tensor, model_kwargs: dict) -> int:
        return 0

    def after(self, input_ids: torch.Tensor, model_kwargs: dict, rows: list[int] | None) -> None:
        pass


PrefillHook = Callable[..., PrefillHooks | None]
"""hook(model, model_kwargs) -> PrefillHooks for this prefill, or None."""


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


def install_shared_prefill(hook: PrefillHook) -> None:
    """Route generate()'s prefill through the wrapper (idempotent: a later call replaces the hook). Raises
    PatchTargetChanged if `_prefill` changed."""
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
        hooks = None
        known = all(k in SHARED_KWARGS or k in ROW_KWARGS or v is None for k, v in model_kwargs.items())
        if is_first_iteration and known and isinstance(input_ids, torch.Tensor) and input_ids.shape[0] > 0:
            hooks = holder[0](self, model_kwargs)
        if hooks is None:
            return original(self, input_ids, generation_config, model_kwargs, is_first_iteration)
        unique, inverse = None, None
        if hooks.share_rows and input_ids.shape[0] > 1:
            unique, inverse = distinct_rows(input_ids, model_kwargs)
            if len(unique) == input_ids.shape[0]:
                unique, inverse = None, None
        sub_ids, sub_kwargs = input_ids, model_kwargs
        if unique is not None:
            pick = torch.tensor(unique, dtype=torch.long)
            sub_kwargs = {k: v.index_select(0, pick.to(v.device)) if k in ROW_KWARGS and isinstance(v, torch.Tensor)
                          else v for k, v in model_kwargs.items()}
            sub_ids = input_ids.index_select(0, pick.to(input_ids.device))
        cached = hooks.before(sub_ids, sub_kwargs)
        outputs = original(self, sub_ids[:, cached:] if cached else sub_ids, generation_config, sub_kwargs,
                           is_first_iteration)
        hooks.after(sub_ids, sub_kwargs, inverse)
        if unique is not None:
            index = torch.tensor(inverse, dtype=torch.long)
            for key in list(outputs.keys()):
                outputs[key] = _expand_output(outputs[key], index, len(unique))
        return outputs

    _prefill.__flashcore_hook__ = holder
    install(GenerationMixin, "_prefill", _prefill, original)
