"""End-to-end generate() on a Llama-3-8B-shaped model (random bf16 weights): flashcore vs stock transformers.

Paths, measured in the same run: flashcore (default PagedKVCache, CUDA graphs of the torch.compile'd decode step,
compiled prefill layers for prompts of 16K+ tokens), flashcore_nocompile (the same graphs of the uncompiled forward,
and an uncompiled prefill: set_compiled_decode(False), set_compiled_prefill(False)), flashcore_eager (no CUDA graphs,
so no compiling either; prompts <= 32K), sdpa + DynamicCache, sdpa + static cache (generate's auto-compile; 1 x 32K),
and transformers' `generate_batch` continuous batching where available (64 x 1K).
Cases: B=1 x 32K prompt, B=1 x 128K, B=32 x 2K, B=64 x 1K; shared prompts (--cases 128x2048same 256x2048same
64samples8192): 128 and 256 copies of one 2K prompt, 64 sampled answers (num_return_sequences) to one 8K prompt,
with flashcore_noshare (flashcore with share_prefixes=False) as a third path; a prefix cache (--cases 32768doc8q):
one 32K document and 8 questions, one generate() each, flashcore_prefix_cache (a PrefixCache kept across the calls)
against flashcore and sdpa (total_s, first and later prefill seconds). Reports prefill seconds, decode tok/s, ms per decode
step and peak GiB, all from one timed generate() per path and case: a logits processor runs after every forward,
records a CUDA event behind it (no sync: flashcore's generate() runs a step ahead of the GPU, which a per-step sync
would stop) and samples torch's peak allocated bytes since the last sample; the bytes of flashcore's page pools
(mapped outside torch's allocator; they only grow during a call) are added once at the end (StepProbe), an upper bound
on the call's peak. prefill_s = call start to the first logits; decode = first to last logits, on the GPU's clock
(idle time waiting for the host included). Warm runs: each path first generates 4 tokens on the same prompt (for
flashcore this captures its decode graph for the timed run's shape, and compiles the step when the model has no
compiled graph for the batch size yet: compiles / compile_s count what this path and case compiled, capture_s the
captures besides compiling).
Greedy tokens are checked against flashcore_eager's: identical_to_eager for flashcore_nocompile (same kernels and
plans; its logits still differ in the last bits, cuBLAS choosing other GEMMs inside captures, so a near-tie can
part the tokens), eager_agreement for the compiled flashcore, which rounds differently: the fraction of new tokens
before each row's first difference (1.0: identical; tests/gpu/ check that differences start only at near-ties).

    python benchmarks/bench_e2e.py                       # everything (about 6 minutes on an H200, compiles included)
    python benchmarks/bench_e2e.py --cases 1x32768 64x1024 --paths flashcore sdpa_dynamic --new 32
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepEvents, device_name, output_dir, print_table, write_csv  # noqa: E402

import flashcore_hf  # noqa: E402,F401  (registers attn_implementation="flashcore")
from flashcore_hf.growable import total_mapped_bytes  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402,E501

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 1024,
                 rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0)
CASES = {"1x32768": (1, 32768), "1x131072": (1, 131072), "32x2048": (32, 2048), "64x1024": (64, 1024),
         "128x2048same": (128, 2048), "256x2048same": (256, 2048), "64samples8192": (64, 8192),
         "32768doc8q": (8, 32768)}
"""case -> (rows, prompt tokens). "...same": every row the same prompt (a batch of copies); "...samples": one prompt,
num_return_sequences=rows with sampling (seeded); "...doc8q": one document, 8 questions asked one generate() each
(run_prefix_cache_case). The others: a different prompt per row."""
SHARED_CASES = ("128x2048same", "256x2048same", "64samples8192", "32768doc8q")
PATHS = ("flashcore", "flashcore_nocompile", "flashcore_eager", "flashcore_noshare", "flashcore_prefix_cache",
         "sdpa_dynamic", "sdpa_static", "generate_batch")
GRAPH_PATHS = ("flashcore", "flashcore_nocompile", "flashcore_noshare")
"""Paths whose decode steps replay CUDA graphs (all compiled except flashcore_nocompile)."""


def build_model(num_layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": num_layers})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None
    return model


def _sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


class StepProbe(LogitsProcessor):
    """After every forward of a generate() call: a CUDA event behind it (no host sync) and torch's peak allocated
    bytes since the last one. `times` (seconds from `start()`, on the GPU's clock) is ready after `finish()`.
    flashcore's page pools (mapped outside torch's allocator) only grow during a call, so `finish` adds their size at
    the end to the largest interval peak: an upper bound on the call's peak, and no per-step cost (walking every pool
    buffer each step added ~2 ms per step to the flashcore paths' timings)."""

    def __init__(self, count_pools: bool):
        self.count_pools = count_pools
        self.peak = 0
        self.times: list[float] = []
        self._events = StepEvents()
        torch.cuda.reset_peak_memory_stats()

    def start(self) -> None:
        """Mark the call's start (the GPU idle: the caller synced)."""
        self._events.start()

    def sample(self) -> None:
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    def finish(self) -> None:
        """The last sample, plus the page pools' bytes (after the timed part); the step times."""
        self.sample()
        self.peak += total_mapped_bytes("cuda") if self.count_pools else 0
        self.times = self._events.times()

    def __call__(self, input_ids, scores):
        self._events.mark()
        self.sample()
        return scores


def run_generate_case(model, path: str, case: str, batch: int, prompt: int, new: int) -> dict:
    kwargs = dict(do_sample=False)
    flashcore_hf.set_cuda_graphs(path in GRAPH_PATHS)
    flashcore_hf.set_compiled_decode(path != "flashcore_nocompile")
    flashcore_hf.set_compiled_prefill(path != "flashcore_nocompile")
    flashcore_hf.set_default_cache_options(share_prefixes=path != "flashcore_noshare")
    model.set_attn_implementation("flashcore" if path.startswith("flashcore") else "sdpa")
    if path == "sdpa_static":
        kwargs["cache_implementation"] = "static"
    generator = torch.Generator(device="cuda").manual_seed(batch * 1000003 + prompt)
    rows = 1 if case.endswith("same") or "samples" in case else batch
    ids = torch.randint(1, model.config.vocab_size, (rows, prompt), device="cuda", generator=generator)
    if case.endswith("same"):
        ids = ids.expand(batch, prompt).contiguous()
    if "samples" in case:
        kwargs.update(do_sample=True, num_return_sequences=batch, top_k=0)
    mask = torch.ones_like(ids)

    def generate(n, probe=None):
        processors = LogitsProcessorList([probe] if probe is not None else [])
        torch.manual_seed(0)
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              logits_processor=processors, **kwargs)

    # Warm: one prefill and a few decode steps (the page-count bucket of a short run is the timed run's, so flashcore
    # captures the timed run's decode graph here; the static cache's torch.compile needs a few decode steps).
    stats = flashcore_hf.decode_graph_stats(model)
    compiled_before = (stats.compiles, stats.compile_seconds) if stats else (0, 0.0)
    generate(4)
    gc.collect()
    torch.cuda.empty_cache()
    stats_before = flashcore_hf.decode_graph_stats(model)
    captures_before = (stats_before.captures, stats_before.compiled_replays) if stats_before else (0, 0)
    probe = StepProbe(count_pools=path.startswith("flashcore"))
    torch.cuda.synchronize()
    probe.start()
    tokens = generate(new, probe)
    probe.finish()
    decode_s = probe.times[-1] - probe.times[0]
    row = dict(prefill_s=probe.times[0], decode_tok_s=batch * (new - 1) / decode_s,
               ms_per_step=1e3 * decode_s / (new - 1), peak_GiB=probe.peak / 2**30)
    stats = flashcore_hf.decode_graph_stats(model)
    if path in GRAPH_PATHS and stats is not None:
        row.update(captures=stats.captures, capture_s=stats.capture_seconds,
                   captures_in_timed_run=stats.captures - captures_before[0],
                   compiled_steps_in_timed_run=stats.compiled_replays - captures_before[1],
                   compiles=stats.compiles - compiled_before[0], compile_s=stats.compile_seconds - compiled_before[1],
                   compiled_model_total_s=stats.compile_seconds, grouped_linears=stats.grouped_linears,
                   compiled_prefills=stats.compiled_prefills, prefill_compile_s=stats.prefill_compile_seconds)
        if stats.compile_failures:
            row["compile_failures"] = "; ".join(stats.compile_failures)[:200]
    if path.startswith("flashcore"):
        _TOKENS[(case, path)] = (tokens[:, prompt:].cpu(), new)
        flashcore_hf.release_decode_graphs(model)     # free graphs and pooled pages before the next path
    flashcore_hf.set_cuda_graphs(True)
    flashcore_hf.set_compiled_decode(True)
    flashcore_hf.set_compiled_prefill(True)
    flashcore_hf.set_default_cache_options(share_prefixes=True)
    return row


def compare_tokens(rows: list[dict]) -> None:
    """Token checks between the flashcore paths of each case (whatever order they ran in): identical_to_eager
    (flashcore_nocompile vs flashcore_eager: identical unless a near-tie parts them), eager_agreement (compiled
    flashcore: mean fraction of new tokens before each row's first difference from flashcore_eager),
    identical_to_shared (flashcore_noshare vs flashcore)."""
    for row in rows:
        case, path = row["case"], row["path"]
        if (case, path) not in _TOKENS:
            continue
        tokens, new = _TOKENS[(case, path)]
        eager = _TOKENS.get((case, "flashcore_eager"), (None,))[0]
        if path == "flashcore_nocompile" and eager is not None:
            row["identical_to_eager"] = bool(torch.equal(tokens, eager))
        if path == "flashcore" and eager is not None:
            same = (tokens == eager).int().cumprod(1).sum(1).float()
            row["eager_agreement"] = (same / new).mean().item()
        if path == "flashcore_noshare" and (case, "flashcore") in _TOKENS:
            row["identical_to_shared"] = bool(torch.equal(tokens, _TOKENS[(case, "flashcore")][0]))


_TOKENS: dict = {}


def run_prefix_cache_case(model, path: str, document: int, questions: int, new: int) -> dict:
    """One document of `document` tokens and `questions` questions of 32 tokens, one generate() per question (greedy,
    `new` tokens): flashcore with a PrefixCache (the document's pages kept from the first call), flashcore without,
    or sdpa + DynamicCache. Reports every call's prefill seconds and the whole loop's."""
    flashcore_hf.set_cuda_graphs(True)
    model.set_attn_implementation("sdpa" if path == "sdpa_dynamic" else "flashcore")
    generator = torch.Generator(device="cuda").manual_seed(document)
    doc = torch.randint(1, model.config.vocab_size, (1, document), device="cuda", generator=generator)
    asks = torch.randint(1, model.config.vocab_size, (questions, 32), device="cuda", generator=generator)
    store = flashcore_hf.PrefixCache(max_pages=-(-document // 64) + 64) if path == "flashcore_prefix_cache" else None
    flashcore_hf.set_default_cache_options(prefix_cache=store or False)
    warm = torch.randint(1, model.config.vocab_size, (1, 256), device="cuda", generator=generator)
    model.generate(warm, max_new_tokens=4, min_new_tokens=4, do_sample=False)     # graphs, kernels, allocator
    prefills, start = [], _sync_time()
    for q in range(questions):
        ids = torch.cat([doc, asks[q:q + 1]], dim=1)
        probe = StepProbe(count_pools=path != "sdpa_dynamic")
        torch.cuda.synchronize()
        probe.start()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       logits_processor=LogitsProcessorList([probe]))
        probe.finish()
        prefills.append(probe.times[0])
    total = _sync_time() - start
    flashcore_hf.set_default_cache_options(prefix_cache=False)
    flashcore_hf.release_decode_graphs(model)
    later = sorted(prefills[1:])
    row = dict(total_s=total, prefill_s=prefills[0], later_prefill_s=later[len(later) // 2] if later else None,
               later_vs_first=(later[len(later) // 2] / prefills[0]) if later else None,
               prefills=" ".join(f"{p:.3f}" for p in prefills))
    if store is not None:
        row["prefix_hits"] = store.stats.hits
    return row


def run_generate_batch(model, batch: int, prompt: int, new: int) -> dict:
    model.set_attn_implementation("sdpa")
    if not hasattr(model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch")
    reqs = [torch.randint(1, model.config.vocab_size, (prompt,)).tolist() for _ in range(batch)]
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=reqs[:4], generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                              eos_token_id=None, pad_token_id=0))
    torch.cuda.reset_peak_memory_stats()
    t0 = _sync_time()
    results = model.generate_batch(inputs=reqs, generation_config=config)
    elapsed = _sync_time() - t0
    results = results.values() if isinstance(results, dict) else results
    tokens = sum(len(getattr(r, "generated_tokens", None) or []) for r in results)
    return dict(decode_tok_s=tokens / elapsed, peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
                note=f"{tokens} tokens in {elapsed:.1f}s, prefill included")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=[c for c in CASES if c not in SHARED_CASES],
                        choices=list(CASES), help="default: the cases without shared prompts")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--new", type=int, default=64, help="new tokens per generate")
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick look")
    args = parser.parse_args()

    model = build_model(args.layers)
    rows = []
    for case in args.cases:
        batch, prompt = CASES[case]
        for path in args.paths:
            if path == "generate_batch" and case != "64x1024":
                continue
            if path == "sdpa_static" and case not in ("1x32768",):
                continue   # the static-cache reference is measured once (it recompiles per shape)
            if path == "flashcore_eager" and (prompt > 32768 or case in SHARED_CASES):
                continue   # two more 128K prefills for the graph-vs-eager check, made on the shorter cases
            if path == "flashcore_noshare" and (case not in SHARED_CASES or case.endswith("doc8q")):
                continue   # the same as flashcore where no row repeats a prompt
            if path == "flashcore_prefix_cache" and not case.endswith("doc8q"):
                continue   # the prefix cache matters where calls repeat a prompt prefix
            if case.endswith("doc8q") and path not in ("flashcore", "flashcore_prefix_cache", "sdpa_dynamic"):
                continue
            row = dict(case=case, path=path, B=batch, prompt=prompt, new=args.new)
            try:
                if case.endswith("doc8q"):
                    result = run_prefix_cache_case(model, path, prompt, batch, args.new)
                elif path == "generate_batch":
                    result = run_generate_batch(model, batch, prompt, args.new)
                else:
                    result = run_generate_case(model, path, case, batch, prompt, args.new)
                row.update(result)
            except Exception as err:  # a reference that fails (OOM, missing API) is reported, not fatal
                traceback.print_exc()
                row["error"] = repr(err)[:200]
            print(row, flush=True)
            rows.append(row)
            write_csv(rows, "bench_e2e.csv")   # rows so far, should a later case not finish
            gc.collect()
            torch.cuda.empty_cache()
    compare_tokens(rows)
    for row in rows:          # ratios against sdpa + DynamicCache of the same case
        ref = next((r for r in rows if r["case"] == row["case"] and r["path"] == "sdpa_dynamic"
                    and "decode_tok_s" in r), None)
        if ref and "decode_tok_s" in row and row["path"] != "generate_batch":
            row["speedup_vs_dynamic"] = row["decode_tok_s"] / ref["decode_tok_s"]
            row["memory_vs_dynamic"] = row["peak_GiB"] / ref["peak_GiB"]
            row["prefill_vs_dynamic"] = row["prefill_s"] / ref["prefill_s"]
    path = write_csv(rows, "bench_e2e.csv")
    plot(rows)
    print(f"\n{device_name()}, torch {torch.__version__}; CSV: {path}")
    print_table(rows, ["case", "path", "prefill_s", "prefill_vs_dynamic", "later_prefill_s", "later_vs_first",
                       "total_s", "decode_tok_s", "ms_per_step", "peak_GiB", "speedup_vs_dynamic",
                       "memory_vs_dynamic", "captures", "capture_s", "compiles", "compile_s", "prefill_compile_s",
                       "grouped_linears",
                       "identical_to_eager",
                       "eager_agreement", "identical_to_shared", "compile_failures", "error"])


def plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(paths))
    for i, p in enumerate(paths):
        for ax, key in zip(axes, ("decode_tok_s", "peak_GiB")):
            xs = [c for c, _ in enumerate(cases)]
            ys = [next((r.get(key, 0) or 0 for r in rows if r["case"] == c and r["path"] == p), 0) for c in cases]
            ax.bar([x + i * width for x in xs], ys, width, label=p)
    for ax, title in zip(axes, ("decode tokens/s", "peak GiB")):
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"generate() on a Llama-3-8B-shaped model, {device_name()}")
    fig.tight_layout()
    fig.savefig(output_dir() / "bench_e2e.png", dpi=110)


if __name__ == "__main__":
    main()
