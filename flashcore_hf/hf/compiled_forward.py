"""What the compiled forwards share (compiled_decode.py: a decode step's whole forward; compiled_prefill.py: the
decoder layers of a long prompt's forward): attention as one opaque op, the cache it works on, the stand-in cache the
traced code sees, the compile backend and how a failed compile is reported.

How a compiled forward is split (vLLM's "unified attention" op works the same way):
- attention, i.e. the layer's `PagedKVCache.update` (append_kv into the pages) and FlashCoreAttention over the step's
  plan (full, window, cascade or sparse selection), is one opaque custom op, `flashcore::step_attention(query, key,
  value, attention_mask, layer_idx, ...)`. Its implementation is the eager code path itself, run on the cache of the
  forward being run (`active_step`); its fake kernel gives the output's shape, so dynamo and inductor see a tensor op;
- everything around it (norms, projections, rotary, MLP, residuals) is traced with `fullgraph=True` against
  `StandInCache`: a cache whose `update` hands the new K/V to the op unchanged and which tells the mask code nothing
  about the step.
Nothing that depends on the step (page lists, plans, which pages exist) is visible to dynamo.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import types
from typing import Optional

import torch
from transformers.cache_utils import Cache

from .attention import FlashCoreAttention

_BACKEND = os.environ.get("FLASHCORE_COMPILE_BACKEND", "inductor")


class FlashCoreCompileWarning(UserWarning):
    """torch.compile could not compile a model's decode step or prefill; that forward runs uncompiled."""


def set_compile_backend(backend: str) -> None:
    """The torch.compile backend of compiled forwards compiled from now on ("inductor"; "aot_eager" to rule out
    inductor's kernels when debugging); env FLASHCORE_COMPILE_BACKEND sets the default."""
    global _BACKEND
    _BACKEND = str(backend)


def compile_backend() -> str:
    return _BACKEND


# ---- the forward being run: what the op's implementation works on ----------------------------------------------

_TRACING_COMPILED_STEP = False
"""True while a compiled forward runs (read by the attention function: dynamo bakes its value into the graph)."""
_ACTIVE_CACHE = None
"""The PagedKVCache of that forward (read only by the op's implementation, never by traced code)."""
_OP_RUNS = 0
"""How many times the op's implementation has started (attention_op_runs)."""


def attention_op_runs() -> int:
    """How many times `flashcore::step_attention` has started running (not tracing): a caller that catches an error
    of a compiled layer can tell whether the layer's K/V may already be in the cache."""
    return _OP_RUNS


def tracing_compiled_step() -> bool:
    """Whether the attention function is being run (or traced) for a compiled forward: it then calls
    `step_attention` on the K/V that StandInCache.update returned."""
    return _TRACING_COMPILED_STEP


@contextlib.contextmanager
def active_step(cache):
    """Run a compiled forward on `cache` (a PagedKVCache: in fixed-step mode for a decode step,
    PagedKVCache.begin_fixed_step; as it is for a prefill); None: run eagerly inside one (no op, no stand-in)."""
    global _TRACING_COMPILED_STEP, _ACTIVE_CACHE
    previous = _TRACING_COMPILED_STEP, _ACTIVE_CACHE
    _TRACING_COMPILED_STEP, _ACTIVE_CACHE = cache is not None, cache
    try:
        yield
    finally:
        _TRACING_COMPILED_STEP, _ACTIVE_CACHE = previous


_ATTENTION = FlashCoreAttention()


# The op's outputs depend on the cache pools, which are not among its arguments (they are found through the active
# step, as vLLM's attention op finds its KV cache through the forward context): the op writes the layer's new K/V into
# the pages and reads them back in the same call, so no other op of the graph touches those pools and declaring it
# functional is safe (its output is always used, and the hidden-state chain orders the layers).
@torch.library.custom_op("flashcore::step_attention", mutates_args=())
def _step_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Optional[torch.Tensor], layer_idx: int, scaling: Optional[float],
                       sliding_window: Optional[int], is_causal: bool, softcap: Optional[float],
                       sinks: Optional[torch.Tensor]) -> torch.Tensor:
    global _OP_RUNS
    cache = _ACTIVE_CACHE
    if cache is None:
        raise RuntimeError("flashcore::step_attention runs only inside a compiled forward "
                           "(flashcore_hf.hf.compiled_forward.active_step)")
    _OP_RUNS += 1
    handle, _ = cache.update(key, value, layer_idx)
    out = _ATTENTION(query, handle, handle, attention_mask, scaling=scaling, sliding_window=sliding_window,
                     is_causal=is_causal, softcap=softcap, sinks=sinks)
    return out.contiguous()


@_step_attention_op.register_fake
def _step_attention_fake(query, key, value, attention_mask, layer_idx, scaling, sliding_window, is_causal, softcap,
                         sinks):
    b, hq, s, d = query.shape
    return query.new_empty((b, s, hq, d))


def step_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, *, scaling: float | None, sliding_window: int | None,
                   is_causal: bool, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention of one layer of a compiled forward: out [B, S, Hq, D] for query [B, Hq, S, D] and the layer's new
    key / value [B, Hkv, S, D] (written into the active step's pages first); attention_mask: what the flashcore mask
    function made (None or 2-D [B, M], the valid keys). layer_idx is passed as dynamo holds it (a traced integer in
    compiled_prefill.py's shared layer graph), never converted, so one graph serves every layer."""
    return _step_attention_op(query, key, value, attention_mask, module.layer_idx,
                              None if scaling is None else float(scaling),
                              None if sliding_window is None else int(sliding_window), bool(is_causal),
                              float(softcap) if softcap else None, sinks)


class StandInCache(Cache):
    """The cache a compiled forward's traced code sees in place of its PagedKVCache.

    update() returns the new K/V unchanged: the flashcore attention function (tracing_compiled_step()) passes them
    to `flashcore::step_attention`, which writes them into the real cache. Mask sizes describe a step without past,
    so the mask code builds no mask (flashcore attention reads the step's plan, not a mask). The cache's length is not
    available: a forward that asks for it (e.g. to make positions when given none) would bake one step's length into
    the graph, so it raises, and the forward runs uncompiled.
    """

    def __init__(self, cache):
        super().__init__(layers=[])
        self._num_layers = len(cache.layers)
        self._is_sliding = list(cache.is_sliding)
        self._is_linear = list(getattr(cache, "is_linear", [False] * self._num_layers))
        self._is_dummy = list(getattr(cache, "is_dummy", [False] * self._num_layers))

    def __len__(self) -> int:
        return self._num_layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self, *args, **kwargs) -> int:
        raise NotImplementedError("a compiled forward does not expose the cache length to the traced code; "
                                  "pass position_ids")

    def get_mask_sizes(self, query_length, *args, **kwargs):
        return query_length, 0

    def get_query_offset(self, *args, **kwargs) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return self._is_sliding

    @property
    def is_linear(self) -> list[bool]:
        return self._is_linear

    @property
    def is_dummy(self) -> list[bool]:
        return self._is_dummy


# ---- compiling ------------------------------------------------------------------------------------------------

_CODE_NUMBERS = itertools.count()


def own_code_function(function, name: str):
    """`function` with a code object of its own, named `name`_N: dynamo keeps compiled code (and counts recompiles
    against its limit of 8) per code object, so each model's compiled forward gets its own entries instead of
    sharing those of every model whose forward has the same code (all transformers models share their decorators'
    wrappers)."""
    code = function.__code__.replace(co_name=f"{name}_{next(_CODE_NUMBERS)}")
    return types.FunctionType(code, function.__globals__, code.co_name)


def dynamo_limits():
    """Past dynamo's recompile limit, raise (the caller falls back and says why) instead of silently running
    eagerly."""
    config = torch._dynamo.config
    if hasattr(config, "fail_on_recompile_limit_hit"):
        return config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def failure_reason(err: BaseException) -> str:
    """A one-line account of why compiling failed: the error's first line, dynamo's debug context (e.g. the exception
    the traced code raised) and the innermost traced source line."""
    text = str(err).strip()
    parts = [f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"]
    context = re.search(r"Developer debug context: (.+)", text)
    if context:
        parts.append(context.group(1).strip())
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text.split("from user code:")[-1]) \
        if "from user code:" in text else []
    if frames:
        path, line, function = frames[-1]
        parts.append(f"at {os.path.basename(path)}:{line} ({function})")
    return "; ".join(parts)[:400]
