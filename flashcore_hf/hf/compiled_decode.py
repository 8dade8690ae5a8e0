"""Compiled decode steps: the model forward that a decode CUDA graph captures, compiled with torch.compile (inductor),
so that RMSNorm, rotary, SiLU * mul and residual adds run as a few fused kernels per layer instead of ~24, while the
cache and attention run exactly as in an eager step.

How the step is split (compiled_forward.py): attention, i.e. the layer's `PagedKVCache.update` and FlashCoreAttention
over the step's plan (full, window, cascade or sparse selection), is one opaque custom op,
`flashcore::step_attention`, run on the cache of the step being captured (`active_step`); the rest of the forward
(embedding, every layer's norms, projections, rotary, MLP, residuals, the final norm and lm_head) is traced with
`fullgraph=True` into one graph, against `StandInCache` (which tells the mask code nothing about the step: flashcore
attention takes no mask on a decode step).
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
  object of its own (`own_code_function`), so dynamo's recompile limit counts per model, not per process.

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
import os
import time

import torch

from ..patches import CACHE_KWARG
from .compiled_forward import (StandInCache, active_step, compile_backend, dynamo_limits, own_code_function,
                               set_compile_backend)
from .linear_grouping import group_small_linears

_ENABLED = os.environ.get("FLASHCORE_COMPILE_DECODE", "1") != "0"
_GROUP_LINEARS = os.environ.get("FLASHCORE_GROUPED_LINEAR", "1") != "0"
"""Whether a compiled step on CUDA groups its few-token linear layers (linear_grouping.py); read at compile time."""
_INDUCTOR_PDL = os.environ.get("FLASHCORE_INDUCTOR_PDL", "1") != "0"
"""Whether inductor's Triton kernels of a compiled step on CUDA launch with programmatic dependent launch (inductor's
`triton.enable_pdl`: each kernel waits for its predecessor at its first dependent load and lets its successor launch
after its loads), so their launches overlap the previous kernel's tail; read at compile time."""


def set_compiled_decode(enabled: bool, backend: str | None = None) -> None:
    """Turn compiled decode steps on or off for every flashcore model in this process (default: on, with inductor).

    Applies to CUDA graphs captured from now on (graphs already captured with the other setting are kept for when
    it returns). backend: a torch.compile backend name ("inductor"; "aot_eager" to rule out inductor's kernels
    when debugging); env FLASHCORE_COMPILE_BACKEND sets the default."""
    global _ENABLED
    _ENABLED = bool(enabled)
    if backend is not None:
        set_compile_backend(backend)


def compiled_decode_enabled() -> bool:
    return _ENABLED


# ---- the compiled forward of one model ------------------------------------------------------------------------

class CompiledDecodeStep:
    """A model forward compiled for decode steps over a PagedKVCache in fixed-step mode (one per model: kept by its
    graph runner, flashcore_hf/hf/decode_graphs.py).

    `step(**forward_kwargs)` runs forward(**forward_kwargs) compiled, with the PagedKVCache (under CACHE_KWARG)
    replaced by a StandInCache and the attention layers reading its fixed step. Raises what compilation raises (the
    runner falls back to the uncompiled forward). compiles: graphs the backend compiled (a recompile adds one);
    compile_seconds: wall time of the calls that compiled (tracing, backend compile and that first run);
    grouped_linears: flashcore::grouped_linear calls the compiled graphs make (on CUDA, unless
    FLASHCORE_GROUPED_LINEAR=0: q/k/v and gate/up of each layer, and the other few-token linears, one call each).
    """

    def __init__(self, forward, backend: str | None = None):
        self.backend_name = backend or compile_backend()
        self.compiles = 0
        self.compile_seconds = 0.0
        self.grouped_linears = 0
        self._backend = torch._dynamo.lookup_backend(self.backend_name)
        self._compiled = torch.compile(own_code_function(_call_forward, "flashcore_decode_step"),
                                       backend=self._count_compiles, fullgraph=True)
        self._forward = forward

    def _count_compiles(self, graph_module, example_inputs):
        self.compiles += 1
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        if _GROUP_LINEARS and on_cuda:
            self.grouped_linears += group_small_linears(graph_module)
        with _inductor_pdl(on_cuda and self.backend_name == "inductor"):
            return self._backend(graph_module, example_inputs)

    def __call__(self, *, fail_on_recompile: bool = False, **forward_kwargs):
        """forward_kwargs: the model forward's, the PagedKVCache under CACHE_KWARG. fail_on_recompile: raise instead
        of compiling (inside a CUDA-graph capture, where compiling cannot run)."""
        cache = forward_kwargs[CACHE_KWARG]
        forward_kwargs[CACHE_KWARG] = StandInCache(cache)
        compiles, start, failed = self.compiles, time.perf_counter(), True
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(active_step(cache))
                stack.enter_context(dynamo_limits())
                if fail_on_recompile:
                    stack.enter_context(torch.compiler.set_stance("fail_on_recompile"))
                out = self._compiled(self._forward, forward_kwargs)
            failed = False
        finally:
            if failed or self.compiles > compiles:   # a failed attempt's tracing time counts too
                self.compile_seconds += time.perf_counter() - start
        return out


def _inductor_pdl(wanted: bool):
    """Inductor's PDL code generation on for the compile inside (when wanted, allowed and this torch has it)."""
    from torch._inductor import config

    if not (wanted and _INDUCTOR_PDL and hasattr(config.triton, "enable_pdl")):
        return contextlib.nullcontext()
    return config.patch({"triton.enable_pdl": True})


def _call_forward(forward, kwargs):
    return forward(**kwargs)
