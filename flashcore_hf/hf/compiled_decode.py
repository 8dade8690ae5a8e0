"""Compiled decode steps: the model forward that a decode CUDA graph captures, compiled with torch.compile (inductor),
so that RMSNorm, rotary, SiLU * mul and residual adds run as a few fused kernels per layer instead of ~24, while the
cache and attention run exactly as in an eager step.

How the step is split (vLLM's "unified attention" op works the same way):
- attention, i.e. the layer's `PagedKVCache.update` (append_kv into the pages) and FlashCoreAttention over the step's
  plan (full, window, cascade or sparse selection), is one opaque custom op, `flashcore::fixed_step_attention(query,
  key, value, layer_idx, ...)`. Its implementation is the eager code path itself, run on the cache of the step being
  captured (`active_step`); its fake kernel gives the output's shape, so dynamo and inductor see a tensor op;
- the rest of the forward (embedding, every layer's norms, projections, rotary, MLP, residuals, the final norm and
  lm_head) is traced with `fullgraph=True` into one graph, against `FixedStepCache`: a stand-in cache whose
  `update` hands the new K/V to the op and which tells the mask code nothing about the step (flashcore attention
  takes no mask on a decode step).
Nothing that depends on the step (page-count buckets, attention plans, positions, which pages exist) is visible to
dynamo, so a page-bucket change, a pool growth or a new generate() call captures a new graph without recompiling.

Measured (CPU, torch 2.13, tiny Llamas; tests/test_compiled_decode.py asserts the counts of this design):
- tracing the fixed-step forward as it is (cache and attention inside the trace): 12 graphs, 11 graph breaks for 2
  layers (torch.get_num_threads in the planner's memo key), and what it traces of the cache's Python (the step's
  plan, page-count bounds) would be baked into the graphs and guarded on;
- `torch.compiler.disable` on `PagedKVCache.update` and the attention function (graph breaks around them), 4 layers:
  10 graphs, a recompile per layer (the pieces read `self.layer_idx`, an int attribute of an nn.Module, which dynamo
  specializes: guards `self.layer_idx == 0`, `== 1`, ...; 32 layers exceed dynamo's recompile limit of 8 and the rest
  run eagerly), and dynamo skips the model's frame ("graph break in a for/while loop"), so nothing fuses across the
  pieces;
- this design: 1 graph, 0 graph breaks for the whole forward (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2,
  GPT-OSS), 0 recompiles across page buckets 2 -> 4 -> 8, new caches and layers. Batch 1 and the first other batch
  size compile static graphs; the next batch size compiles one with a dynamic batch (dynamo's automatic dynamic
  shapes) that every later size reuses: at most 3 compiles per model. Each model's runner compiles through a code
  object of its own (`_own_code_function`), so dynamo's recompile limit counts per model, not per process.

Fusion changes rounding: outputs are no longer bit-identical to eager steps (tests/gpu/ compare with an fp32
reference instead). Compilation happens during the warm-up before a capture (its seconds in DecodeGraphStats.
compile_seconds); inductor's caches (FX graph and AOTAutograd caches, on by default, in TORCHINDUCTOR_CACHE_DIR) make
a later process's compile of the same model mostly a cache hit (CPU, one layer: 15 s cold, 3.7 s warm).
Off: `set_compiled_decode(False)`, FLASHCORE_COMPILE_DECODE=0, or everything that turns decode CUDA graphs off. If
compilation fails (model code dynamo cannot trace in one graph), the runner warns once (FlashCoreCompileWarning),
counts the reason and captures the uncompiled forward.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
import types
from typing import Optional

import torch
from transformers.cache_utils import Cache

from ..patches import CACHE_KWARG
from .attention import FlashCoreAttention
from .linear_grouping import group_small_linears

_ENABLED = os.environ.get("FLASHCORE_COMPILE_DECODE", "1") != "0"
_BACKEND = os.environ.get("FLASHCORE_COMPILE_BACKEND", "inductor")
_GROUP_LINEARS = os.environ.get("FLASHCORE_GROUPED_LINEAR", "1") != "0"
"""Whether a compiled step on CUDA groups its few-token linear layers (linear_grouping.py); read at compile time."""


class FlashCoreCompileWarning(UserWarning):
    """torch.compile could not compile a model's decode step; its CUDA graphs capture the uncompiled forward."""


def set_compiled_decode(enabled: bool, backend: str | None = None) -> None:
    """Turn compiled decode steps on or off for every flashcore model in this process (default: on, with inductor).

    Applies to CUDA graphs captured from now on (graphs already captured with the other setting are kept for when
    it returns). backend: a torch.compile backend name ("inductor"; "aot_eager" to rule out inductor's kernels
    when debugging); env FLASHCORE_COMPILE_BACKEND sets the default."""
    global _ENABLED, _BACKEND
    _ENABLED = bool(enabled)
    if backend is not None:
        _BACKEND = str(backend)


def compiled_decode_enabled() -> bool:
    return _ENABLED


def compile_backend() -> str:
    return _BACKEND


# ---- the step being run: what the op's implementation works on --------------------------------------------------

_TRACING_FIXED_STEP = False
"""True while a compiled decode step runs (read by the attention function: dynamo bakes its value into the graph)."""
_ACTIVE_CACHE = None
"""The PagedKVCache of that step (read only by the op's implementation, never by traced code)."""


def tracing_fixed_step() -> bool:
    """Whether the attention function is being run (or traced) for a compiled decode step: it then calls
    `fixed_step_attention` on the K/V that FixedStepCache.update returned."""
    return _TRACING_FIXED_STEP


@contextlib.contextmanager
def active_step(cache):
    """Run the forward of a compiled decode step on `cache` (a PagedKVCache in fixed-step mode:
    PagedKVCache.begin_fixed_step)."""
    global _TRACING_FIXED_STEP, _ACTIVE_CACHE
    previous = _TRACING_FIXED_STEP, _ACTIVE_CACHE
    _TRACING_FIXED_STEP, _ACTIVE_CACHE = True, cache
    try:
        yield
    finally:
        _TRACING_FIXED_STEP, _ACTIVE_CACHE = previous


_ATTENTION = FlashCoreAttention()


# The op's outputs depend on the cache pools, which are not among its arguments (they are found through the active
# step, as vLLM's attention op finds its KV cache through the forward context): the op writes the layer's new K/V into
# the pages and reads them back in the same call, so no other op of the graph touches those pools and declaring it
# functional is safe (its output is always used, and the hidden-state chain orders the layers).
@torch.library.custom_op("flashcore::fixed_step_attention", mutates_args=())
def _fixed_step_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                             scaling: Optional[float], sliding_window: Optional[int], is_causal: bool,
                             softcap: Optional[float], sinks: Optional[torch.Tensor]) -> torch.Tensor:
    cache = _ACTIVE_CACHE
    if cache is None:
        raise RuntimeError("flashcore::fixed_step_attention runs only inside a compiled decode step "
                           "(flashcore_hf.hf.compiled_decode.active_step)")
    handle, _ = cache.update(key, value, layer_idx)
    out = _ATTENTION(query, handle, handle, None, scaling=scaling, sliding_window=sliding_window,
                     is_causal=is_causal, softcap=softcap, sinks=sinks)
    return out.contiguous()


@_fixed_step_attention_op.register_fake
def _fixed_step_attention_fake(query, key, value, layer_idx, scaling, sliding_window, is_causal, softcap, sinks):
    b, hq, s, d = query.shape
    return query.new_empty((b, s, hq, d))


def fixed_step_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                         scaling: float | None, sliding_window: int | None, is_causal: bool, softcap: float | None,
                         sinks: torch.Tensor | None) -> torch.Tensor:
    """Attention of one layer of a compiled decode step: out [B, S, Hq, D] for query [B, Hq, S, D] and the layer's
    new key / value [B, Hkv, S, D] (written into the active step's pages first)."""
    return _fixed_step_attention_op(query, key, value, int(module.layer_idx),
                                    None if scaling is None else float(scaling),
                                    None if sliding_window is None else int(sliding_window), bool(is_causal),
                                    float(softcap) if softcap else None, sinks)


class FixedStepCache(Cache):
    """The cache a compiled decode step's forward sees in place of its PagedKVCache.

    update() returns the new K/V unchanged: the flashcore attention function (tracing_fixed_step()) passes them to
    `flashcore::fixed_step_attention`, which writes them into the real cache. Mask sizes describe a step without
    past, so the mask code builds no mask (flashcore attention reads the step's plan, not a mask). The cache's
    length is not available: a forward that asks for it (e.g. to make positions when given none) would bake one
    step's length into the graph, so it raises, and the step is captured uncompiled.
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
        raise NotImplementedError("a compiled decode step does not expose the cache length to the model forward; "
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


# ---- the compiled forward of one model ------------------------------------------------------------------------

_STEP_NUMBERS = itertools.count()


def _call_forward(forward, kwargs):
    return forward(**kwargs)


def _own_code_function():
    """`_call_forward` with a code object of its own: dynamo keeps compiled code (and counts recompiles against its
    limit of 8) per code object, so each model's compiled step gets its own entries instead of sharing those of
    every model whose forward has the same code (all transformers models share their decorators' wrappers)."""
    code = _call_forward.__code__.replace(co_name=f"flashcore_decode_step_{next(_STEP_NUMBERS)}")
    return types.FunctionType(code, _call_forward.__globals__, code.co_name)


class CompiledDecodeStep:
    """A model forward compiled for decode steps over a PagedKVCache in fixed-step mode (one per model: kept by its
    graph runner, flashcore_hf/hf/decode_graphs.py).

    `step(**forward_kwargs)` runs forward(**forward_kwargs) compiled, with the PagedKVCache (under CACHE_KWARG)
    replaced by a FixedStepCache and the attention layers reading its fixed step. Raises what compilation raises (the
    runner falls back to the uncompiled forward). compiles: graphs the backend compiled (a recompile adds one);
    compile_seconds: wall time of the calls that compiled (tracing, backend compile and that first run);
    grouped_linears: flashcore::grouped_linear calls the compiled graphs make (on CUDA, unless
    FLASHCORE_GROUPED_LINEAR=0: q/k/v and gate/up of each layer, and the other few-token linears, one call each).
    """

    def __init__(self, forward, backend: str | None = None):
        self.backend_name = backend or _BACKEND
        self.compiles = 0
        self.compile_seconds = 0.0
        self.grouped_linears = 0
        self._backend = torch._dynamo.lookup_backend(self.backend_name)
        self._compiled = torch.compile(_own_code_function(), backend=self._count_compiles, fullgraph=True)
        self._forward = forward

    def _count_compiles(self, graph_module, example_inputs):
        self.compiles += 1
        if _GROUP_LINEARS and any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
            self.grouped_linears += group_small_linears(graph_module)
        return self._backend(graph_module, example_inputs)

    def __call__(self, *, fail_on_recompile: bool = False, **forward_kwargs):
        """forward_kwargs: the model forward's, the PagedKVCache under CACHE_KWARG. fail_on_recompile: raise instead
        of compiling (inside a CUDA-graph capture, where compiling cannot run)."""
        cache = forward_kwargs[CACHE_KWARG]
        forward_kwargs[CACHE_KWARG] = FixedStepCache(cache)
        compiles, start, failed = self.compiles, time.perf_counter(), True
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(active_step(cache))
                stack.enter_context(_dynamo_limits())
                if fail_on_recompile:
                    stack.enter_context(torch.compiler.set_stance("fail_on_recompile"))
                out = self._compiled(self._forward, forward_kwargs)
            failed = False
        finally:
            if failed or self.compiles > compiles:   # a failed attempt's tracing time counts too
                self.compile_seconds += time.perf_counter() - start
        return out


def _dynamo_limits():
    """Past dynamo's recompile limit, raise (the runner falls back and says why) instead of silently running eagerly."""
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
