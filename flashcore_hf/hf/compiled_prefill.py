"""Compiled prefill: the decoder layers of a long prompt's forward run compiled (torch.compile, inductor), so that
RMSNorm, rotary, SiLU * mul and residual adds run as a few fused kernels per layer instead of ~20 unfused ones,
while the cache and attention run exactly as eagerly (the opaque `flashcore::step_attention` op, compiled_forward.py).

Why: in a long prefill the elementwise code of transformers' layers is the largest part after attention and the
GEMMs: a 32K-token prompt of a Llama-3-8B-shaped model spends 0.25 s of its 1.4 s in it (H200,
benchmarks/profile_prefill.py), and fused it takes about half of that (notes/prefill.md).

Regional: one decoder layer's forward is compiled with a dynamic token count and reused by every layer and every
prompt length (dynamo treats the layer's parameters as graph inputs, and `allow_unspec_int_on_nn_module` turns the
layer's integer attributes, `layer_idx` among them, into graph inputs instead of a guard per layer). The integer
attributes that every layer shares (head_dim, ...) are then pinned back to constants (`shared_int_attributes`): left
symbolic, the rotary kernel's index arithmetic divided by the head dim at run time in 64 bits and ran at ~0.25 TB/s
(7 ms per layer at 128K tokens, H200; notes/prefill.md). Measured (CPU,
4 layers): batches of several rows compile 2 graphs (layer 0's, which holds its index as a constant, then one that
takes it as an input and serves every other layer), a single row 1 more; none for a new prompt length. Layer
variants (sliding and full attention layers) add theirs. The model's own forward (embedding, positions, the mask,
the final norm, lm_head) runs eagerly around it, so positions and masks come from the real cache as always. A layer is compiled by giving it an instance `forward` for the duration of the
call (removed afterwards: a later forward of the model runs its own code); layers that already have an instance
`forward` (accelerate's hooks) leave the model's prefill eager.

Where: the CUDA-graph runner's forward (decode_graphs.py) runs a forward through CompiledPrefill when it is a
multi-token forward over a PagedKVCache of at least MIN_TOKENS new tokens on CUDA without gradients. Shorter prompts
run eagerly (the compile, 13-17 s cold for the 8B shape on an H200, less from inductor's on-disk caches in a later
process, is paid once per model and process, and it pays back only on long prompts; short prompts also stay
bit-identical to uncompiled flashcore). Fusion changes rounding: compiled prefill logits match eager ones up to bf16 rounding
(tests/gpu/test_compiled_prefill_gpu.py holds its error against an fp32 reference to stock sdpa's).

Off: `set_compiled_prefill(False)`, FLASHCORE_COMPILE_PREFILL=0, or what turns CUDA-graph decode off
(`set_cuda_graphs(False)`, `generate(..., disable_compile=True)`). A compile that fails warns once
(FlashCoreCompileWarning), counts its reason in DecodeGraphStats.compile_failures and leaves the model's prefills
eager; the layer whose compile failed runs eagerly in the same forward (a compile fails before the layer writes its
K/V, so they are written once either way).
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

from ..patches import CACHE_KWARG
from .compiled_forward import (StandInCache, active_step, attention_op_runs, compile_backend, dynamo_limits,
                               own_code_function)

_ENABLED = os.environ.get("FLASHCORE_COMPILE_PREFILL", "1") != "0"
MIN_TOKENS = 16384
"""New tokens (batch x prompt length) from which a prefill runs compiled."""
RECOMPILE_LIMIT = 24
"""Graphs one model's compiled layer may have (dynamo's default of 8 is below what layer variants can need)."""


def set_compiled_prefill(enabled: bool) -> None:
    """Turn compiled prefill on or off for every flashcore model in this process (default: on)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def compiled_prefill_enabled() -> bool:
    return _ENABLED


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The model's decoder layers when compiled prefill can run them (a ModuleList of layers without an instance
    forward of their own), else None."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    if any("forward" in layer.__dict__ for layer in layers):
        return None
    return layers


class CompiledPrefill:
    """The decoder layers of one model, compiled for multi-token forwards over a PagedKVCache (one per model: kept
    by its graph runner, flashcore_hf/hf/decode_graphs.py).

    `prefill(forward, layers, kwargs)` runs forward(**kwargs) with every layer of `layers` compiled. compiles:
    graphs the backend compiled; compile_seconds: wall time of the layer calls that compiled (tracing, backend compile
    and that first run); runs: forwards run with compiled layers; failure: why compiling failed (None: it did not),
    after which every layer runs eagerly.
    """

    def __init__(self, backend: str | None = None):
        self.backend_name = backend or compile_backend()
        self.compiles = 0
        self.compile_seconds = 0.0
        self.runs = 0
        self.failure: BaseException | None = None
        self._backend = torch._dynamo.lookup_backend(self.backend_name)
        self._compiled = torch.compile(own_code_function(_call_layer, "flashcore_prefill_layer"),
                                       backend=self._count_compiles, fullgraph=True, dynamic=True)

    def _count_compiles(self, graph_module, example_inputs):
        self.compiles += 1
        return self._backend(graph_module, example_inputs)

    def __call__(self, forward, layers: torch.nn.ModuleList, kwargs: dict):
        """forward(**kwargs) (the model's forward; the PagedKVCache under CACHE_KWARG) with `layers` compiled."""
        global _SHARED_INTS
        cache = kwargs[CACHE_KWARG]
        stand_in = StandInCache(cache)
        for layer in layers:
            layer.forward = functools.partial(self._layer, layer, cache, stand_in)
        _SHARED_INTS = shared_int_attributes(layers)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(active_step(cache))
                stack.enter_context(dynamo_limits())
                stack.enter_context(torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True,
                                                               recompile_limit=RECOMPILE_LIMIT))
                out = forward(**kwargs)
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
        self.runs += 1
        return out

    def _layer(self, layer, cache, stand_in, /, *args, **kwargs):
        """One decoder layer's forward: compiled (its cache the stand-in, its attention the op), or eagerly as without
        compiled prefill once compiling has failed or when the layer is not given the cache."""
        if self.failure is None and kwargs.get(CACHE_KWARG) is cache:
            compiles, runs, start = self.compiles, attention_op_runs(), time.perf_counter()
            try:
                out = self._compiled(layer, args, {**kwargs, CACHE_KWARG: stand_in})
            except Exception as err:
                if attention_op_runs() != runs:   # the layer's K/V may be written: running it again would repeat them
                    raise
                self.failure = err
                self.compile_seconds += time.perf_counter() - start
            else:
                if self.compiles > compiles:
                    self.compile_seconds += time.perf_counter() - start
                return out
        with active_step(None):
            return type(layer).forward(layer, *args, **kwargs)


_SHARED_INTS: tuple = ()
"""shared_int_attributes() of the layers of the latest compiled prefill (set as it starts), read by the traced
`_call_layer` as a global: dynamo takes a global's integers as constants (and guards on them), not as graph inputs."""


def shared_int_attributes(layers: torch.nn.ModuleList) -> tuple[tuple[tuple[str, ...], str, int], ...]:
    """(submodule path from the layer, attribute name, value) of every integer attribute of a layer or of its direct
    submodules (attention, MLP, norms: where transformers' layer code keeps head_dim and the like) that every layer of
    `layers` has with the same value: the attributes a layer's compiled graph may hold as constants. Attributes that
    differ between layers (layer_idx) stay graph inputs, so one graph serves them all. Deeper modules (a linear's
    features, an MoE's experts) are left out: their forwards read weights, not integers, and each pinned attribute is
    a guard evaluated at every layer call."""
    def int_attributes(layer):
        modules = [((), layer)] + [((name,), child) for name, child in layer.named_children()]
        return {(path, name): value for path, module in modules for name, value in vars(module).items()
                if type(value) is int}
    shared = int_attributes(layers[0])
    for layer in layers[1:]:
        other = int_attributes(layer)
        shared = {key: value for key, value in shared.items() if other.get(key) == value}
    return tuple((path, name, value) for (path, name), value in shared.items())


def _call_layer(layer, args, kwargs, /):
    # Pin the shared integer attributes: each check makes dynamo replace the attribute's symbol by its value in the
    # whole graph, so inductor's kernels index with constants instead of run-time divisions by symbolic sizes.
    for path, name, value in _SHARED_INTS:
        module = layer
        for part in path:
            module = getattr(module, part)
        torch._check(getattr(module, name) == value)
    return type(layer).forward(layer, *args, **kwargs)
