"""Long-context generation with flashcore: a drop-in `attn_implementation="flashcore"`, paged KV cache included.

    python examples/long_context_generate.py                         # small random Llama, offline, CPU-friendly
    python examples/long_context_generate.py --compare sdpa          # same work with stock SDPA + DynamicCache
    python examples/long_context_generate.py --model meta-llama/Llama-3.2-1B --device cuda --context 32768

The prompt is `--context` random token ids (seeded), so no tokenizer is needed. Prints prefill time (to the first
new token), decode speed, peak memory and the KV cache's page statistics; with `--compare sdpa` the two runs side by
side and whether they generated the same tokens.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.generation.streamers import BaseStreamer

import flashcore_hf  # registers attn_implementation="flashcore"
from flashcore_hf.growable import total_mapped_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def builtin_config(context: int, new_tokens: int) -> LlamaConfig:
    """A small random Llama (4 layers, hidden 256, 8 query / 2 KV heads of 32 dims) for offline runs."""
    return LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=context + new_tokens,
                       rope_theta=500000.0, tie_word_embeddings=True)


class ProgressStreamer(BaseStreamer):
    """generate() calls put() with the prompt, then with each new token: a progress bar plus the time of each."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.count = total, label, 0
        self.start = self.first_token = self.last_token = None
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="tok", leave=False)
        except ImportError:
            self.bar = None

    def put(self, value: torch.Tensor) -> None:
        value.cpu()  # waits for the device: the step is done
        now = time.perf_counter()
        if self.start is None:  # the prompt
            self.start = now
            return
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            done = self.count * 30 // self.total
            sys.stderr.write(f"\r{self.label} [{'#' * done}{'.' * (30 - done)}] {self.count}/{self.total}")
            sys.stderr.flush()

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\r" + " " * 60 + "\r")


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated by torch since the last reset plus flashcore's page pools (mapped outside torch's
    allocator; an upper bound). CPU: the process's peak resident set size so far."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) + total_mapped_bytes(device)) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(model, implementation: str, input_ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy generation with `implementation` (after a short warm-up run); timings, memory, tokens, cache."""
    model.set_attn_implementation(implementation)
    device = input_ids.device
    with torch.inference_mode():  # first-call costs (kernel loading, thread pools, allocator) stay out of the timing
        model.generate(input_ids[:, :64], max_new_tokens=2, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    streamer = ProgressStreamer(new_tokens, implementation)
    with torch.inference_mode():
        out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=streamer, return_dict_in_generate=True, pad_token_id=0)
    decode_s = streamer.last_token - streamer.first_token
    return {
        "implementation": implementation,
        "cache": type(getattr(out, flashcore_hf.CACHE_KWARG)).__name__,
        "prefill_s": streamer.first_token - streamer.start,
        "decode_tok_s": (streamer.count - 1) / decode_s if decode_s > 0 else float("nan"),
        "peak_gib": peak_memory_gib(device),
        "tokens": out.sequences[0, input_ids.shape[1]:].cpu(),
        "cache_obj": getattr(out, flashcore_hf.CACHE_KWARG),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model id or path (default: a small random Llama built offline)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--context", type=int, help="prompt tokens (default: 2048 on CPU, 16384 on CUDA)")
    parser.add_argument("--new", type=int, help="new tokens (default: 32 on CPU, 128 on CUDA)")
    parser.add_argument("--page-size", type=int, default=64, help="tokens per KV page")
    parser.add_argument("--compare", choices=["sdpa"], help="also run stock SDPA + DynamicCache")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if on_cuda else "float32")]
    context = args.context or (16384 if on_cuda else 2048)
    new_tokens = args.new or (128 if on_cuda else 32)
    flashcore_hf.set_default_cache_options(page_size=args.page_size)

    torch.manual_seed(args.seed)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="flashcore")
        model = model.to(device)
        source = args.model
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(builtin_config(context, new_tokens), dtype=dtype,
                                                     attn_implementation="flashcore")
        source = "built-in random Llama (4 layers, hidden 256)"
    model.eval()
    vocab = model.config.get_text_config(decoder=True).vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(1, vocab, (1, context), generator=generator).to(device)
    print(f"model: {source} | device {device} | {dtype} | prompt {context} tokens | {new_tokens} new tokens | "
          f"page size {args.page_size}")

    results = [run(model, "flashcore", input_ids, new_tokens)]
    if args.compare:
        results.append(run(model, args.compare, input_ids, new_tokens))

    memory = "peak CUDA memory" if on_cuda else "peak RSS (process)"
    print(f"\n{'':22}" + "".join(f"{r['implementation']:>18}" for r in results))
    for label, key, fmt in (("cache", "cache", "{:>18}"), ("prefill (s)", "prefill_s", "{:>18.3f}"),
                            ("decode (tok/s)", "decode_tok_s", "{:>18.1f}"), (f"{memory} (GiB)", "peak_gib",
                                                                              "{:>18.2f}")):
        print(f"{label:22}" + "".join(fmt.format(r[key]) for r in results))
    print(f"\n{results[0]['cache_obj'].stats()}")
    graphs = flashcore_hf.decode_graph_stats(model)
    if graphs is not None:
        print(f"CUDA-graph decode: {graphs.captures} capture(s) in {graphs.capture_seconds:.2f} s (included in the "
              f"decode time above), {graphs.replays} replayed steps, {graphs.eager_decode_steps} eager decode steps")
    if args.compare:
        same = torch.equal(results[0]["tokens"], results[1]["tokens"])
        agreed = int((results[0]["tokens"] == results[1]["tokens"]).cumprod(0).sum())
        print(f"generated tokens identical to {args.compare}: {same} ({agreed}/{new_tokens} before the first "
              "difference)")


if __name__ == "__main__":
    main()
