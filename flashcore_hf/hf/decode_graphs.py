"""CUDA-graph decode: generate()'s decode steps replay a captured CUDA graph of the whole model forward.

A stock transformers decode step costs ~60 ms on an H200 whatever the batch or context: host overhead of hundreds of
small kernel launches, not attention or memory. With a PagedKVCache everything a decode step needs on the device has
a fixed size once the host has planned the step: the page lists, each new token's slot, the token ids and positions.
So the model forward is captured once per key (batch size, page-count bucket, page pools) into a CUDA graph whose
inputs are fixed buffers, and every decode step then
  1. plans on the host (page allocation and page lists: `PagedKVCache.plan_decode_step`; planned while the GPU
     runs the previous step, `PagedKVCache.prepare_next_decode_step`),
  2. copies that plan (one host-to-device copy) and the new token ids into the graph's buffers,
  3. replays the graph.
Prefill, multi-token steps, beam reordering (host side) and anything unusual run eagerly; a long prefill (at least
compiled_prefill.MIN_TOKENS new tokens) runs with its decoder layers compiled (compiled_prefill.py).

The captured forward is compiled (compiled_decode.py: torch.compile with inductor, attention and the cache as one
opaque op per layer), so norms, rotary, activations and residual adds run fused; compiled once per model and batch
size (at most 3 times: batch sizes past the second share a dynamic-batch graph), never per page bucket or generate()
call. Fusion changes rounding, so outputs match eager steps up to bf16 rounding. With compilation off
(`flashcore_hf.set_compiled_decode(False)`, FLASHCORE_COMPILE_DECODE=0) a replay runs the same kernels with the same
plans as an eager step (the kernels' page bound is bucketed in both), so outputs are bit-identical to the eager path.

One graph per batch size: generate() keeps the batch fixed for a whole call (finished rows keep running), and padding
a batch up to a bucket would change every GEMM's shape and with it the rounding of the results.

Page pools: a captured graph holds the pools' addresses and their page count (and, with sparse selection, the
addresses of the per-page key bounds, which come from the same arena). Caches that generate() creates draw
their pools from one `PoolArena` per model, so the next generate() call reuses the same memory and the same graphs;
a pool growth (rare: `PagedKVCache(expected_max_length=...)` grows once per generation) captures anew.

The host runs a step ahead: generate() checks whether to stop one step late over a PagedKVCache on CUDA
(`defers_stop_check`, through transformers' DeferredStopCheck), so it plans and launches step N+1 while the GPU runs
step N instead of waiting for it; a step past a stop is undone (its tokens dropped, a returned cache cropped by one
token) and costs one replay per generate() that ends on an end-of-sequence token (none when it ends at max length).
Streamers get each token one step later.

On by default for flashcore models on one CUDA device. Off (graphs and compilation, decode and prefill, and the
deferred stop check): `flashcore_hf.set_cuda_graphs(False)`, the environment variable FLASHCORE_CUDA_GRAPHS=0, or
`model.generate(..., disable_compile=True)` (graphs and compilation for that call).
`decode_graph_stats(model)` reports captures, compiles and their cost, and replays; `release_decode_graphs(model)`
frees the graphs and the pool arena (the compiled forward is kept: the next capture does not compile again).
"""
from __future__ import annotations

import functools
import os
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..cache import PagedKVCache, PoolArena, StepPlan
from ..cache.step_plan import StepShape
from ..layout import PageLayout
from ..patches import CACHE_KWARG
from .compiled_decode import CompiledDecodeStep, compiled_decode_enabled
from .compiled_forward import FlashCoreCompileWarning, compile_backend, failure_reason
from .compiled_prefill import MIN_TOKENS as MIN_COMPILED_PREFILL_TOKENS, CompiledPrefill, compiled_prefill_enabled, \
    decoder_layers

_ENABLED = os.environ.get("FLASHCORE_CUDA_GRAPHS", "1") != "0"
_MAX_GRAPHS_PER_MODEL = 8
# Keyword arguments generate() passes to a decode step that the captured forward can stand for.
_ALLOWED_KWARGS = frozenset({"input_ids", CACHE_KWARG, "attention_mask", "use_cache", "return_dict",
                             "position_ids", "logits_to_keep", "output_attentions", "output_hidden_states"})


def set_cuda_graphs(enabled: bool) -> None:
    """Turn CUDA-graph decode on or off for every flashcore model in this process (default: on)."""
    global _ENABLED
    _ENABLED = bool(enabled)


def cuda_graphs_enabled() -> bool:
    return _ENABLED


@dataclass
class DecodeGraphStats:
    """What the graph runner of one model did: captures (capture_seconds: their time besides compiling), replays,
    decode steps run eagerly and why (eager_reasons: reason -> steps); compiled decode (compiled_decode.py):
    compiled_captures / compiled_replays (of graphs of the compiled forward), compiles (graphs torch.compile
    compiled: at most 3 per model, see compiled_decode.py), compile_seconds (their time), compile_failures (reason ->
    captures that fell back to the uncompiled forward, and prefills that stayed eager), grouped_linears
    (flashcore::grouped_linear calls in the compiled graphs: linear_grouping.py); compiled prefill
    (compiled_prefill.py): compiled_prefills (forwards run with compiled layers), prefill_compiles and
    prefill_compile_seconds (what compiling their layers took)."""

    captures: int = 0
    capture_seconds: float = 0.0
    replays: int = 0
    eager_decode_steps: int = 0
    eager_reasons: dict[str, int] = field(default_factory=dict)
    compiled_captures: int = 0
    compiled_replays: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0
    compile_failures: dict[str, int] = field(default_factory=dict)
    grouped_linears: int = 0
    compiled_prefills: int = 0
    prefill_compiles: int = 0
    prefill_compile_seconds: float = 0.0

    def count_eager(self, reason: str) -> None:
        self.eager_decode_steps += 1
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1


class _FixedStep:
    """The fixed device buffers of one captured decode step (packed like a step's metadata at the bucket's
    capacities: flashcore_hf.cache.step_plan.StepShape), its graph and its output."""

    def __init__(self, shape: StepShape, device: torch.device):
        self.shape = shape
        self.meta = torch.zeros(sum(shape.sizes()), dtype=torch.int32, device=device)
        self.device_step = shape.split(self.meta)
        self.input_ids = torch.zeros(shape.batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(shape.batch, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None   # the graph's output buffer
        self.output_type = None                   # the model's output class
        self.compiled = False                     # whether the graph holds the compiled forward

    def load_noop(self, plan: StepPlan) -> None:
        """A step that reads no page and writes no slot (for the warm-up and the capture): every query run of every
        layout reads nothing, every slot is -1 (a cascade keeps `plan`'s query order and groups)."""
        b = self.shape.batch
        empty = torch.empty(0, dtype=torch.int32)
        layouts = {kind: PageLayout(torch.zeros(self.shape.rows(kind) + 1, dtype=torch.int32), empty, empty, empty)
                   for kind, _ in self.shape.capacities}
        host = self.shape.pack(torch.arange(b + 1, dtype=torch.int32), torch.full((b,), -1, dtype=torch.int32),
                               layouts, plan.host_parts[3], pin=False)
        self.meta.copy_(host)

    def load(self, plan: StepPlan) -> None:
        """Copy a host plan into the buffers (one host-to-device copy; no sync)."""
        self.meta.copy_(self.shape.pack(*plan.host_parts, pin=True), non_blocking=True)


class DecodeGraphRunner:
    """Stands in for a model's `forward`: decode steps over a PagedKVCache replay CUDA graphs, long prefills over one
    run with compiled decoder layers, all else runs eagerly."""

    def __init__(self, model: torch.nn.Module, forward):
        self._model = weakref.ref(model)
        self._forward = forward
        self._graphs: OrderedDict[tuple, _FixedStep] = OrderedDict()
        self.arena = PoolArena()
        self.stats = DecodeGraphStats()
        self.enabled_for_call = True       # generate(disable_compile=True) turns it off for that call
        self._compiled: CompiledDecodeStep | None = None   # made at the first compiled capture, kept for the model
        self._compile_failure: str | None = None           # why compiling failed (the runner then stops trying)
        self._prefill: CompiledPrefill | None = None       # made at the first long prefill, kept for the model
        self._warned: set[str] = set()                     # what a FlashCoreCompileWarning was given for
        functools.update_wrapper(self, forward)

    def __call__(self, *args, **kwargs):
        layers = None if args else self._compiled_prefill_layers(kwargs)
        if layers is not None:
            return self._compiled_prefill(layers, kwargs)
        if args or not self._eligible(kwargs):
            return self._forward(*args, **kwargs)
        return self._replay(kwargs)

    def release(self) -> None:
        """Drop every captured graph and the pool arena (their memory is freed once no cache uses it)."""
        self._graphs.clear()
        self.arena = PoolArena()

    # ---- eligibility -------------------------------------------------------------------------------------------

    def _eligible(self, kwargs) -> bool:
        """Whether this forward is a decode step to replay. A one-token step over a PagedKVCache on CUDA that cannot
        be replayed runs eagerly and its reason is counted in stats.eager_reasons."""
        ids, cache = kwargs.get("input_ids"), kwargs.get(CACHE_KWARG)
        if not (_ENABLED and self.enabled_for_call and isinstance(cache, PagedKVCache)
                and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1 and ids.is_cuda):
            return False
        if torch.cuda.is_current_stream_capturing():   # our own capture's forward
            return False
        blocker = self._decode_step_blocker(kwargs) or cache.fixed_decode_step_blocker(ids.shape[0], ids.device)
        if blocker is not None:
            self.stats.count_eager(blocker)
            return False
        return True

    def _decode_step_blocker(self, kwargs) -> str | None:
        """Why a one-token forward is not a plain decode step a captured graph stands for (None: it is)."""
        model = self._model()
        if model is None or model.config._attn_implementation != "flashcore":
            return "the model's attention implementation is not flashcore"
        if torch.is_grad_enabled():
            return "gradients are enabled"
        unknown = sorted(set(kwargs) - _ALLOWED_KWARGS)
        if unknown:
            return f"forward kwargs a graph does not cover: {unknown}"
        if kwargs.get("use_cache") is False or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return "use_cache=False, output_attentions or output_hidden_states"
        if kwargs.get("logits_to_keep") not in (None, 0, 1):
            return "logits_to_keep > 1"
        return None

    # ---- compiled prefill ---------------------------------------------------------------------------------------

    def _compiled_prefill_layers(self, kwargs) -> torch.nn.ModuleList | None:
        """The decoder layers to compile when this forward is a long prefill that runs with compiled layers (at least
        MIN_COMPILED_PREFILL_TOKENS new tokens over a PagedKVCache on CUDA, without gradients or extra outputs, while
        compiling has not failed), else None."""
        ids = kwargs.get("input_ids")
        if not (_ENABLED and self.enabled_for_call and compiled_prefill_enabled()
                and isinstance(kwargs.get(CACHE_KWARG), PagedKVCache) and isinstance(ids, torch.Tensor)
                and ids.dim() == 2 and ids.numel() >= MIN_COMPILED_PREFILL_TOKENS and ids.is_cuda):
            return None
        if (self._prefill is not None and self._prefill.failure is not None) or torch.is_grad_enabled():
            return None
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return None
        model = self._model()
        if model is None or model.config.get_text_config(decoder=True)._attn_implementation != "flashcore":
            return None
        return decoder_layers(model)

    def _compiled_prefill(self, layers: torch.nn.ModuleList, kwargs):
        if self._prefill is None:
            self._prefill = CompiledPrefill(compile_backend())
        prefill = self._prefill
        try:
            return prefill(self._forward, layers, kwargs)
        finally:
            self.stats.compiled_prefills = prefill.runs
            self.stats.prefill_compiles = prefill.compiles
            self.stats.prefill_compile_seconds = prefill.compile_seconds
            if prefill.failure is not None:   # (set in this call: a failed CompiledPrefill is not called again)
                self._warn_compile_failure(prefill.failure, "prefill layers",
                                           "its prefills run uncompiled (same results, more kernels per layer). "
                                           "flashcore_hf.set_compiled_prefill(False) skips the attempt.")

    # ---- replay and capture ------------------------------------------------------------------------------------

    def _replay(self, kwargs):
        ids, cache = kwargs["input_ids"], kwargs[CACHE_KWARG]
        batch, device = ids.shape[0], ids.device
        plan = cache.plan_decode_step(device)          # may grow the pools (and bounds): part of the key below
        bucket = plan.max_pages["full"]
        compiled = self._compile_this_capture()
        key = (batch, bucket, plan.cascade_key, cache.device_buffers(), cache.sparse, compiled)
        step = self._graphs.get(key)
        if step is None:
            step = self._capture(cache, plan, device, key, compiled)
        else:
            self._graphs.move_to_end(key)
        step.load(plan)
        step.input_ids.copy_(ids)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the model computes without them: the padded length before this token
            step.position_ids.fill_(plan.padded_len - 1)
        else:
            step.position_ids.copy_(position_ids.expand(batch, 1))
        step.graph.replay()
        cache.finish_replayed_step(plan)
        cache.prepare_next_decode_step(device)         # host work of the next step while the GPU runs this one
        self.stats.replays += 1
        self.stats.compiled_replays += int(step.compiled)
        # A copy: the graph's output buffer is overwritten by the next replay, while generate() may keep logits.
        return step.output_type(logits=step.logits.clone(), **{CACHE_KWARG: cache})

    def _compile_this_capture(self) -> bool:
        """Whether a new capture takes the compiled forward: compiled decode is on and compiling did not fail."""
        return compiled_decode_enabled() and self._compile_failure is None

    def _capture(self, cache: PagedKVCache, plan: StepPlan, device: torch.device, key, compiled: bool) -> _FixedStep:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        compile_seconds = self._compiled.compile_seconds if self._compiled is not None else 0.0
        step = _FixedStep(cache.fixed_decode_shape(plan), device)
        step.load_noop(plan)
        step.position_ids.fill_(plan.padded_len - 1)
        forward_kwargs = {"input_ids": step.input_ids, "position_ids": step.position_ids, CACHE_KWARG: cache,
                          "use_cache": True, "return_dict": True}
        # Warm-up outside the capture (compilation, library handles, lazy initialisation) on a side stream, as CUDA
        # graphs require; the no-op step reads no page and writes no slot, so the cache is unchanged.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            if compiled:
                compiled = self._warm_up_compiled(cache, step, plan, forward_kwargs)
            if not compiled:
                cache.begin_fixed_step(step.device_step, step.shape, plan)
                self._forward(**forward_kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        output = None
        if compiled:
            graph, output = self._capture_forward(cache, step, plan, forward_kwargs, compiled=True)
        if output is None:
            compiled = False
            graph, output = self._capture_forward(cache, step, plan, forward_kwargs, compiled=False)
        # Keep only the logits buffer: the output also references the cache, which must not outlive its generate()
        # call (it would keep the pool arena leased and the next cache would map fresh pools).
        step.graph, step.logits, step.output_type, step.compiled = graph, output.logits, type(output), compiled
        del output, forward_kwargs
        key = key[:-1] + (compiled,)        # what the graph holds (a failed compile captured the eager forward)
        self._graphs[key] = step
        while len(self._graphs) > _MAX_GRAPHS_PER_MODEL:
            self._graphs.popitem(last=False)
        torch.cuda.synchronize(device)
        self.stats.captures += 1
        self.stats.compiled_captures += int(compiled)
        if self._compiled is not None:
            self.stats.compiles = self._compiled.compiles
            self.stats.grouped_linears = self._compiled.grouped_linears
            compile_seconds = self._compiled.compile_seconds - compile_seconds
            self.stats.compile_seconds += compile_seconds
        self.stats.capture_seconds += time.perf_counter() - start - compile_seconds
        return step

    def _capture_forward(self, cache, step: _FixedStep, plan: StepPlan, forward_kwargs, compiled: bool):
        """(graph, output) of one capture of the step's forward; output None when the compiled forward failed."""
        graph = torch.cuda.CUDAGraph()
        cache.begin_fixed_step(step.device_step, step.shape, plan)
        if not compiled:
            with torch.cuda.graph(graph):
                output = self._forward(**forward_kwargs)
            return graph, output
        try:
            with torch.cuda.graph(graph):
                # The warm-up compiled this very call (same shapes, same guards): nothing may compile in a capture.
                output = self._compiled(fail_on_recompile=True, **forward_kwargs)
        except Exception as err:   # never fail a user's generate() over compilation: capture the eager forward
            self._compile_failed(err)
            return graph, None
        return graph, output

    def _warm_up_compiled(self, cache, step: _FixedStep, plan: StepPlan, forward_kwargs) -> bool:
        """Run the compiled forward once (compiling it on the first call); False, after one warning, if it failed."""
        cache.begin_fixed_step(step.device_step, step.shape, plan)
        try:
            if self._compiled is None:
                self._compiled = CompiledDecodeStep(self._forward, compile_backend())
            self._compiled(**forward_kwargs)
        except Exception as err:   # model code torch.compile cannot take whole, a backend error: run uncompiled
            self._compile_failed(err)
            return False
        return True

    def _compile_failed(self, err: Exception) -> None:
        self._warn_compile_failure(err, "decode step", "its CUDA graphs capture the uncompiled forward (same results, "
                                   "more kernels per step). flashcore_hf.set_compiled_decode(False) skips the attempt.")
        self._compile_failure = failure_reason(err)

    def _warn_compile_failure(self, err: BaseException, what: str, consequence: str) -> None:
        """Count why compiling `what` failed; warn once per model and `what`."""
        reason = failure_reason(err)
        self.stats.compile_failures[reason] = self.stats.compile_failures.get(reason, 0) + 1
        if what not in self._warned:
            self._warned.add(what)
            model = self._model()
            warnings.warn(f"flashcore: torch.compile could not compile the {what} of "
                          f"{type(model).__name__ if model is not None else 'the model'} ({reason}); {consequence}",
                          FlashCoreCompileWarning, stacklevel=3)


_MODELS_WITH_RUNNERS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def remove_runners() -> None:
    """Give every model its own forward back (flashcore_hf.unpatch): no decode step replays a graph afterwards."""
    for model in list(_MODELS_WITH_RUNNERS):
        if _runner(model) is not None:
            del model.forward
    _MODELS_WITH_RUNNERS.clear()


def _runner(model) -> DecodeGraphRunner | None:
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, DecodeGraphRunner) else None


def _single_cuda_device(model) -> bool:
    device_map = getattr(model, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        return False
    return next(model.parameters()).is_cuda


def prepare_for_generate(model, generation_config) -> None:
    """Called at the start of every generate(): routes a flashcore CUDA model's forward through a DecodeGraphRunner
    (installed once, as an instance attribute) and applies `disable_compile` to this call."""
    if model.config.get_text_config(decoder=True)._attn_implementation != "flashcore":
        return
    runner = _runner(model)
    if runner is None:
        if not (_ENABLED and torch.cuda.is_available() and _single_cuda_device(model)):
            return
        runner = DecodeGraphRunner(model, model.forward)
        model.forward = runner
        _MODELS_WITH_RUNNERS.add(model)
    runner.enabled_for_call = not getattr(generation_config, "disable_compile", False)


def defers_stop_check(device: torch.device, cache) -> bool:
    """Whether generate() reads its stop flag one step late (patches/deferred_stop.py) for this cache: a PagedKVCache
    whose pools all live on the CUDA device generate() runs on (not a model spread over devices), while CUDA graphs
    are on. The flag it would wait for each step is the previous step's, so the host work of step N+1 overlaps the
    GPU's step N; crop() undoes the extra step past a stop in a returned cache."""
    return (_ENABLED and device.type == "cuda" and isinstance(cache, PagedKVCache)
            and all(layer.k_pool is None or layer.k_pool.device == device for layer in cache.layers))


def pool_arena(model) -> PoolArena | None:
    """The model's pool arena (for the caches generate() creates), when its decode steps use CUDA graphs."""
    runner = _runner(model)
    return runner.arena if runner is not None and _ENABLED else None


def decode_graph_stats(model) -> DecodeGraphStats | None:
    """Captures, capture and compile seconds, replays and eager decode steps of the model's graph runner (None: not
    in use)."""
    runner = _runner(model)
    return None if runner is None else runner.stats


def release_decode_graphs(model) -> None:
    """Free the model's captured decode graphs and its pool arena."""
    runner = _runner(model)
    if runner is not None:
        runner.release()
