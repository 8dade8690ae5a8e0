"""Long-context question answering with flashcore, measured: `attn_implementation="flashcore"` and its paged KV cache.

With a local checkpoint the script reads a document and one or more questions, applies the tokenizer's chat template
when it has one, prefills the prompt chunk by chunk through the paged cache (a progress bar per chunk), streams the
answer, and reports prefill time, decode speed, end-to-end time, peak memory and the cache's page statistics. Each
attention implementation runs in a fresh process, so its memory is measured alone; `--compare sdpa` runs stock SDPA
with a DynamicCache the same way and says whether the generated tokens match.

    # offline smoke run (no checkpoint): the built-in random Llama on random token ids, fast on a CPU
    python examples/long_context_generate.py
    python examples/long_context_generate.py --compare sdpa --context 8192 --new 64

    # a local checkpoint with its tokenizer (download one first, e.g. `hf download ID --local-dir DIR`)
    python examples/long_context_generate.py --model DIR --prompt-file report.txt --question "Who signed it?"
    cat report.txt | python examples/long_context_generate.py --model DIR --question "Who signed it?" --compare sdpa
    # a batch: several questions over one document, one left-padded row each
    python examples/long_context_generate.py --model DIR --prompt-file report.txt \\
        --question "Who signed it?" --question "When?" --question "What does it cost?"
    # sparse decode: each step reads at most 4096 key tokens per sequence and KV head (Quest top-k or StreamingLLM)
    python examples/long_context_generate.py --model DIR --prompt-file book.txt --question "..." \\
        --sparse topk --budget 4096
    # a machine-readable record on stdout (progress and text go to stderr)
    python examples/long_context_generate.py --model DIR --prompt-file report.txt --question "..." --json > run.json

Memory: on CUDA the peak of torch's allocations during generate() plus the bytes mapped in flashcore's page pools
(which live outside torch's allocator: flashcore_hf.growable.total_mapped_bytes); on the CPU the peak resident set
size of the run's process during generate() (the kernel's high-water mark, reset just before the call) and how much
of it generate() added.

Multi-GPU (not run by the test suite):
  - Layers split over the visible GPUs, one process (accelerate's big-model inference, `pip install accelerate`):
        python examples/long_context_generate.py --model DIR --device-map auto --prompt-file doc.txt --question "..."
    `from_pretrained(DIR, device_map="auto")`; each layer's page pools live on that layer's GPU.
  - Tensor parallel, one process per GPU (transformers' native TP: attention heads and MLPs are sharded, each rank
    keeps the KV pages of its own heads):
        torchrun --nproc-per-node 4 examples/long_context_generate.py --model DIR --tp \\
            --prompt-file doc.txt --question "..."
    The model is loaded with `from_pretrained(DIR, distributed_config=DistributedConfig(tp_plan="auto"))`, which is
    `from_pretrained(DIR, tp_plan="auto")` without the FutureWarning transformers 5.17-5.24 give for `tp_plan=`;
    transformers initialises torch.distributed from torchrun's environment and shards over WORLD_SIZE ranks. Every
    rank runs the same generate() on the same inputs; rank 0 prints. The model needs a TP plan
    (`config.base_model_tp_plan`: Llama, Qwen, Mistral, ...) and a number of KV heads divisible by the GPU count.
    No `--device-map` with `--tp`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, DistributedConfig, DynamicCache, LlamaConfig,
                          TextStreamer)
from transformers.generation.streamers import BaseStreamer

import flashcore_hf  # registers attn_implementation="flashcore"
from flashcore_hf import CACHE_KWARG, PagedKVCache, SparseConfig
from flashcore_hf.growable import total_mapped_bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOKE_NOTE = ("SMOKE RUN: the built-in random Llama on random token ids (no checkpoint, so the tokens mean nothing); "
              "it checks the install and times the kernels. Use --model DIR for question answering.")
WARMUP_COLUMNS = 64


def builtin_config(context: int, new_tokens: int, head_dim: int = 32) -> LlamaConfig:
    """A small random Llama (4 layers, hidden 256, 8 query / 2 KV heads of `head_dim` dims) for offline runs. The
    smoke run uses 64 on CUDA: the CUDA kernels take head dims 64 and 128 (32 would fall back to SDPA there)."""
    return LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=head_dim, vocab_size=32000,
                       max_position_embeddings=context + new_tokens, rope_theta=500000.0, tie_word_embeddings=True)


def builtin_head_dim(device: str) -> int:
    """The built-in model's head dim on `device`: 64 on CUDA (a head dim the CUDA kernels take), 32 elsewhere."""
    return 64 if str(device).startswith("cuda") else 32


# ---- command line ---------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """Everything a run needs, resolved from the command line (plain values: it crosses into a fresh process)."""

    model: str | None            # checkpoint directory; None: the built-in random Llama (smoke run)
    document: str | None
    questions: list[str]
    device: str
    dtype: str
    device_map: str | None
    tp: bool
    context: int                 # smoke run: prompt tokens
    new_tokens: int
    page_size: int
    prefill_chunk: int           # 0: the whole prompt in one forward
    sparse: str | None
    budget: int | None
    seed: int
    compare: str | None          # a second implementation to run ("sdpa")
    json: bool

    @property
    def smoke(self) -> bool:
        return self.model is None

    def sparse_config(self) -> SparseConfig | None:
        if self.sparse is None:
            return None
        budget = {} if self.budget is None else {"token_budget": self.budget}
        return SparseConfig(policy=self.sparse, **budget)


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum (the error names the flag, e.g. 'argument --new: must be >= 1')."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse type: 'cpu', 'cuda' or 'cuda:N'."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"flashcore runs on cpu or cuda, not {device.type}")
    return str(device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples, memory accounting and multi-GPU use: see the top of this file.")
    what = parser.add_argument_group("what to run")
    what.add_argument("--model", metavar="DIR", help="local checkpoint directory with its tokenizer (default: the "
                      "built-in random Llama on random token ids, a smoke run)")
    what.add_argument("--prompt-file", metavar="PATH", help="the document; '-' or a pipe: stdin")
    what.add_argument("--question", action="append", metavar="TEXT",
                      help="a question about the document; repeat it for a batch (one left-padded row each)")
    what.add_argument("--context", type=int_at_least(1), metavar="N",
                      help="smoke run only: prompt tokens (default 2048 on CPU, 16384 on CUDA)")
    what.add_argument("--new", type=int_at_least(1), metavar="N",
                      help="most new tokens per row (default 32 on CPU, 128 on CUDA); the smoke run makes exactly N")
    how = parser.add_argument_group("how")
    how.add_argument("--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available)")
    how.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    how.add_argument("--device-map", choices=["auto"], help="split the layers over the visible GPUs (accelerate)")
    how.add_argument("--tp", action="store_true", help="tensor parallel over the GPUs of a torchrun launch")
    how.add_argument("--page-size", type=int_at_least(1), default=64, metavar="N", help="tokens per KV page (64)")
    how.add_argument("--prefill-chunk", type=int_at_least(0), metavar="N",
                     help="prefill N prompt tokens per forward (generate()'s prefill_chunk_size, which also bounds "
                          "activation memory); 0: the whole prompt at once (default 512 on CPU, 4096 on CUDA)")
    how.add_argument("--sparse", choices=["streaming", "topk"], help="sparse page selection for decode steps")
    how.add_argument("--budget", type=int_at_least(1), metavar="N",
                     help=f"with --sparse: key tokens each step reads per sequence and KV head "
                          f"(default {SparseConfig.token_budget})")
    out = parser.add_argument_group("report")
    out.add_argument("--compare", choices=["sdpa"], help="also run stock SDPA + DynamicCache, in a fresh process")
    out.add_argument("--json", action="store_true", help="print a JSON record on stdout (everything else: stderr)")
    out.add_argument("--seed", type=int, default=0, help="seed of the random model and prompt (smoke run)")
    return parser


def read_document(parser: argparse.ArgumentParser, path: str | None) -> str:
    """The document from `path`, or from stdin when path is '-' or absent and stdin is not a terminal."""
    if path is None and sys.stdin.isatty():
        parser.error("--prompt-file: give the document (a text file, or pipe it on stdin)")
    try:
        if path in (None, "-"):
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"--prompt-file: cannot read {path or 'stdin'}: {err}")
    if not text.strip():
        parser.error(f"--prompt-file: the document ({path or 'stdin'}) is empty")
    return text


def check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options that do not go together (parser.error: exit code 2, the message names the flag)."""
    if args.model is None:
        for flag, value in (("--prompt-file", args.prompt_file), ("--question", args.question),
                            ("--device-map", args.device_map), ("--tp", args.tp or None)):
            if value is not None:
                parser.error(f"{flag} needs --model DIR (the smoke run without --model uses random token ids)")
    else:
        if not os.path.isdir(args.model):
            parser.error(f"--model: {args.model!r} is not a directory (a local checkpoint with its tokenizer; "
                         "download a hub model first, e.g. `hf download ID --local-dir DIR`)")
        if args.device_map is not None and args.device is not None:
            parser.error("--device-map auto places the model itself: drop --device")
        if args.context is not None:
            parser.error("--context applies to the smoke run only; with --model the prompt is the document")
        if not args.question:
            parser.error("--question: ask at least one question about the document (with --model)")
    if args.budget is not None and args.sparse is None:
        parser.error("--budget needs --sparse streaming|topk")
    if args.tp:
        if "WORLD_SIZE" not in os.environ:
            parser.error("--tp: launch with torchrun, e.g. `torchrun --nproc-per-node 4 "
                         "examples/long_context_generate.py --model DIR --tp ...`")
        if args.device_map is not None or (args.device is not None and not args.device.startswith("cuda")):
            parser.error("--tp places one shard per GPU: no --device-map, no --device cpu")
        if args.prompt_file in (None, "-"):
            parser.error("--tp: give the document with --prompt-file PATH (every rank reads it; stdin reaches one)")


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Job:
    """Defaults that depend on the machine, the document, and checks that need torch or flashcore."""
    if args.tp:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if on_cuda and not flashcore_hf.HAS_CUDA_KERNELS:
        parser.error(f"--device {device}: flashcore_hf was built without CUDA kernels; rebuild it where nvcc is "
                     "found (pip install --no-build-isolation -e .) or use --device cpu")
    job = Job(model=args.model, document=None, questions=args.question or [], device=str(device),
              dtype=args.dtype or ("bfloat16" if on_cuda else "float32"), device_map=args.device_map, tp=args.tp,
              context=args.context or (16384 if on_cuda else 2048), new_tokens=args.new or (128 if on_cuda else 32),
              page_size=args.page_size,
              prefill_chunk=args.prefill_chunk if args.prefill_chunk is not None else (4096 if on_cuda else 512),
              sparse=args.sparse, budget=args.budget, seed=args.seed, compare=args.compare,
              json=args.json)
    try:
        sparse = job.sparse_config()
        if sparse is not None:
            sparse.page_counts(job.page_size)
    except ValueError as err:
        parser.error(f"--budget {job.budget} with --page-size {job.page_size}: {err}")
    if job.model is not None:
        job.document = read_document(parser, args.prompt_file)
    return job


def parse_args(argv: list[str] | None = None) -> Job:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_combinations(parser, args)
    return resolve(parser, args)


# ---- model and inputs -----------------------------------------------------------------------------------------------

def load_model(job: Job, implementation: str):
    """(model in eval mode, tokenizer or None) for `implementation` ("flashcore" or "sdpa")."""
    dtype = DTYPES[job.dtype]
    if job.smoke:
        torch.manual_seed(job.seed)  # the same random weights in every run's process
        with torch.device(job.device):
            config = builtin_config(job.context, job.new_tokens, builtin_head_dim(job.device))
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=implementation)
        return model.eval(), None
    kwargs = dict(dtype=dtype, attn_implementation=implementation)
    if job.tp:  # = tp_plan="auto", without the FutureWarning a tp_plan argument gives
        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    elif job.device_map is not None:
        kwargs["device_map"] = job.device_map
    model = AutoModelForCausalLM.from_pretrained(job.model, **kwargs)
    if not job.tp and job.device_map is None:
        model = model.to(job.device)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {job.model} has neither a pad nor an eos token to pad a batch with")
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def question_prompts(tokenizer, document: str, questions: list[str]) -> tuple[list[str], bool]:
    """One prompt per question: the document then the question, in the chat template when the tokenizer has one.
    Returns (prompts, templated); a templated prompt already holds its special tokens."""
    messages = [f"{document.strip()}\n\nQuestion: {question}" for question in questions]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                              add_generation_prompt=True) for m in messages], True
    return [f"{m}\nAnswer:" for m in messages], False


def make_inputs(job: Job, model, tokenizer) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [rows, columns] on the model's input device (left padded)."""
    device = model.device  # with device_map="auto": the first layers' GPU, where the embedding is
    if job.smoke:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        generator = torch.Generator().manual_seed(job.seed)
        ids = torch.randint(1, vocab, (1, job.context), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    prompts, templated = question_prompts(tokenizer, job.document, job.questions)
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated)
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def make_cache(model, job: Job, implementation: str, columns: int):
    """flashcore: a PagedKVCache with the page size and sparse policy asked for; sdpa: a DynamicCache."""
    if implementation != "flashcore":
        return DynamicCache(config=model.config)
    return PagedKVCache(model.config, page_size=job.page_size, sparse=job.sparse_config(),
                        expected_max_length=columns + job.new_tokens)


def generation_kwargs(job: Job, tokenizer, columns: int, new_tokens: int | None = None) -> dict:
    """Greedy decoding of at most `new_tokens` (default job.new_tokens) after `columns` prompt columns; the smoke run
    always makes that many (its random model has no meaningful EOS). The limit goes in as max_length, which replaces
    a checkpoint's own max_length (max_new_tokens next to one makes transformers warn)."""
    new_tokens = job.new_tokens if new_tokens is None else new_tokens
    kwargs = dict(max_length=columns + new_tokens, do_sample=False, return_dict_in_generate=True,
                  prefill_chunk_size=job.prefill_chunk or None)
    if job.smoke:
        kwargs.update(min_new_tokens=new_tokens, pad_token_id=0)
    else:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return kwargs


# ---- progress and measurement ---------------------------------------------------------------------------------------

class AnswerPrinter(TextStreamer):
    """transformers' TextStreamer (word-aligned text as tokens arrive), writing to `stream`."""

    def __init__(self, tokenizer, stream):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


class GenerationMonitor(BaseStreamer):
    """Progress and timing of one generate() call.

    Prefill: a forward hook on the model counts the prompt's chunks (every forward before the first new token) and
    advances a bar by each chunk's columns. Decode: generate() hands this streamer the prompt once, then each step's
    new tokens; with a printer (one row and a tokenizer) the answer is printed as text, otherwise a bar per token.
    """

    def __init__(self, label: str, columns: int, new_tokens: int, stream, printer: AnswerPrinter | None = None,
                 show: bool = True):
        self.label, self.columns, self.new_tokens = label, columns, new_tokens
        self.stream, self.printer, self.show = stream, printer, show
        self.prompt_time = self.first_token = self.last_token = None
        self.chunks, self.steps = 0, 0
        self.bar = None
        self._hook = None

    def attach(self, model) -> None:
        self._hook = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def _after_forward(self, module, args, kwargs, output) -> None:
        if self.prompt_time is None or self.first_token is not None:
            return  # not a prefill chunk of this generate() call
        ids = kwargs.get("input_ids", args[0] if args else None)
        if getattr(output, "logits", None) is not None and output.logits.is_cuda:
            torch.cuda.synchronize(output.logits.device)  # the bar follows the GPU, not the launch queue
        self.chunks += 1
        self.bar.set_postfix_str(f"chunk {self.chunks}", refresh=False)
        self.bar.update(ids.shape[-1] if ids is not None else 0)

    def put(self, value: torch.Tensor) -> None:
        value = value.cpu()  # waits for the device: the step is done
        now = time.perf_counter()
        if self.prompt_time is None:  # generate() hands over the prompt first, then prefills
            self.prompt_time = now
            self.bar = self._bar("prefill", self.columns, self.show)
            if self.printer is not None:
                self.printer.put(value)
            return
        if self.first_token is None:
            self._start_decode(now)
        self.last_token = now
        self.steps += 1
        if self.printer is not None:
            self.printer.put(value)
        else:
            self.bar.update(1)

    def _start_decode(self, now: float) -> None:
        self.first_token = now
        if self._hook is not None:
            self._hook.remove()
        if self.bar is not None:
            self.bar.close()
        if self.show:
            self.stream.write(f"[{self.label}] prefill: {self.columns} columns in {self.chunks} chunk(s), "
                              f"{now - self.prompt_time:.2f} s\n")
        if self.printer is not None:
            if self.show:
                self.stream.write(f"[{self.label}] answer: ")
                self.stream.flush()
            else:
                self.printer = None
        self.bar = self._bar("decode", self.new_tokens, self.show and self.printer is None)

    def _bar(self, phase: str, total: int, show: bool) -> tqdm:
        return tqdm(total=total, desc=f"[{self.label}] {phase}", unit="tok", file=sys.stderr, disable=not show,
                    dynamic_ncols=True, leave=False)

    def end(self) -> None:
        if self.printer is not None:
            self.printer.end()
        if self.bar is not None:
            self.bar.close()


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak memory of one generate() call.

    CUDA: torch's peak allocated bytes on the model's GPUs (reset at start) plus the bytes mapped in flashcore's
    page pools, which torch's allocator does not see. CPU: the process's peak resident set size during the call
    (Linux: the high-water mark VmHWM, reset at start through /proc/self/clear_refs) and what the call added to the
    resident set it started with; where the reset is impossible, the process's peak since it started (ru_maxrss).
    """

    def __init__(self, model):
        self.devices = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
        self.rss_before = 0
        self.hwm_reset = False

    def start(self) -> None:
        gc.collect()
        for device in self.devices:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        self.rss_before = (_proc_status_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False

    def stop(self) -> dict:
        if self.devices:
            for device in self.devices:
                torch.cuda.synchronize(device)
            allocated = sum(torch.cuda.max_memory_allocated(d) for d in self.devices)
            pools = total_mapped_bytes("cuda")
            return {"kind": "cuda", "peak_bytes": allocated + pools, "torch_peak_allocated_bytes": allocated,
                    "page_pool_bytes": pools}
        hwm = _proc_status_kib("VmHWM") if self.hwm_reset else None
        if hwm is None:  # no per-call reset: the process's peak so far (a fresh process: load, warm-up and run)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            return {"kind": "cpu-rss-since-process-start", "peak_bytes": peak, "rss_before_bytes": self.rss_before,
                    "added_bytes": None}
        peak = hwm * 1024
        return {"kind": "cpu-rss", "peak_bytes": peak, "rss_before_bytes": self.rss_before,
                "added_bytes": peak - self.rss_before}


# ---- one run --------------------------------------------------------------------------------------------------------

def is_reporting_rank() -> bool:
    """False on every rank but 0 of a torchrun launch (they run the same generate() silently)."""
    return int(os.environ.get("RANK", "0")) == 0


def warm_up(model, inputs: dict, job: Job, implementation: str, tokenizer) -> None:
    """A short generate() first, so one-time costs (kernel loading, thread pools, allocator) stay out of the timing.
    It uses the last columns, where every row has real tokens (left padding)."""
    short = {name: tensor[:, -WARMUP_COLUMNS:] for name, tensor in inputs.items()}
    columns = short["input_ids"].shape[1]
    cache = make_cache(model, job, implementation, columns)
    kwargs = generation_kwargs(job, tokenizer, columns, new_tokens=2) | dict(prefill_chunk_size=None)
    with torch.inference_mode():
        model.generate(**short, **kwargs, **{CACHE_KWARG: cache})
    del cache
    gc.collect()


def measured_generate(model, tokenizer, inputs: dict, job: Job, implementation: str):
    """One generate() with progress, timing and memory: (output, GenerationMonitor, memory record, seconds)."""
    rows, columns = inputs["input_ids"].shape
    stream = sys.stderr if job.json else sys.stdout
    printer = AnswerPrinter(tokenizer, stream) if tokenizer is not None and rows == 1 else None
    monitor = GenerationMonitor(implementation, columns, job.new_tokens, stream, printer, is_reporting_rank())
    cache = make_cache(model, job, implementation, columns)
    meter = MemoryMeter(model)
    monitor.attach(model)
    meter.start()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, **generation_kwargs(job, tokenizer, columns), streamer=monitor,
                             **{CACHE_KWARG: cache})
    seconds = time.perf_counter() - start
    return out, monitor, meter.stop(), seconds


def run_record(model, tokenizer, inputs: dict, out, monitor: GenerationMonitor) -> dict:
    """The measured run as plain values: timings, tokens (and their text), the cache's page statistics."""
    rows, columns = inputs["input_ids"].shape
    new = out.sequences[:, columns:].cpu().tolist()
    decode_s = monitor.last_token - monitor.first_token
    prefill_s = monitor.first_token - monitor.prompt_time
    cache = getattr(out, CACHE_KWARG)
    stats = cache.stats() if isinstance(cache, PagedKVCache) else None
    graphs = flashcore_hf.decode_graph_stats(model)
    return {
        "cache": type(cache).__name__,
        "prefill_s": prefill_s,
        "prefill_chunks": monitor.chunks,
        "prefill_tok_s": int(inputs["attention_mask"].sum()) / prefill_s,
        "decode_steps": monitor.steps,
        "decode_tok_s": rows * (monitor.steps - 1) / decode_s if decode_s > 0 else None,  # all rows together
        "cache_stats": dataclasses.asdict(stats) if stats is not None else None,
        "cache_stats_text": str(stats) if stats is not None else None,
        "decode_graphs": dataclasses.asdict(graphs) if graphs is not None else None,
        "tokens": new,
        "answers": [tokenizer.decode(r, skip_special_tokens=True).strip() for r in new] if tokenizer else None,
        "prompt_tokens": inputs["attention_mask"].sum(dim=1).tolist(),
        "columns": columns,
        "max_position_embeddings": getattr(model.config.get_text_config(decoder=True), "max_position_embeddings",
                                           None),
    }


def run_implementation(job: Job, implementation: str) -> dict:
    """Load the model with `implementation`, warm up, then one measured generate(); a plain-value record."""
    start = time.perf_counter()
    model, tokenizer = load_model(job, implementation)
    load_s = time.perf_counter() - start
    inputs = make_inputs(job, model, tokenizer)
    warm_up(model, inputs, job, implementation, tokenizer)
    out, monitor, memory, seconds = measured_generate(model, tokenizer, inputs, job, implementation)
    return {"implementation": implementation, "load_s": load_s, "end_to_end_s": seconds, "memory": memory,
            **run_record(model, tokenizer, inputs, out, monitor)}


class RunFailed(RuntimeError):
    """A run's process raised or died; the message says which and why."""


def _worker(job: Job, implementation: str, sender) -> None:
    try:
        result = run_implementation(job, implementation)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which reports it
        sender.send(("error", traceback.format_exc()))
        sys.exit(1)
    sender.send(("ok", result))


def run_in_fresh_process(job: Job, implementation: str) -> dict:
    """run_implementation in a new process, so each implementation starts from the same state and its memory is its
    own. CPU: a fork of this process (no torch op has run in it yet, so none of torch's threads exist). CUDA: a
    spawned interpreter (a CUDA context does not survive fork)."""
    method = "fork" if torch.device(job.device).type == "cpu" and sys.platform == "linux" else "spawn"
    context = multiprocessing.get_context(method)
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker, args=(job, implementation, sender), name=f"{implementation} run")
    sys.stdout.flush()
    sys.stderr.flush()
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "died", None
    process.join()
    if status == "ok":
        return payload
    if status == "error":
        raise RunFailed(f"the {implementation} run failed:\n{payload}")
    hint = " (killed: out of memory?)" if process.exitcode == -9 else ""
    raise RunFailed(f"the {implementation} run's process ended without a result, exit code {process.exitcode}{hint}")


def run_all(job: Job, implementations: list[str]) -> list[dict]:
    """Each implementation in a fresh process; under torchrun (--tp) in this process, one after the other."""
    if job.tp:
        results = []
        for implementation in implementations:
            results.append(run_implementation(job, implementation))
            gc.collect()
            torch.cuda.empty_cache()
        torch.distributed.destroy_process_group()  # transformers created it from torchrun's environment
        return results
    return [run_in_fresh_process(job, implementation) for implementation in implementations]


# ---- report ---------------------------------------------------------------------------------------------------------

def compare_tokens(reference: dict, other: dict) -> dict:
    """Whether two runs generated the same tokens, and per row how many agree before the first difference."""
    agreed = []
    for a, b in zip(reference["tokens"], other["tokens"]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        agreed.append(n)
    return {"implementation": other["implementation"], "tokens_match": reference["tokens"] == other["tokens"],
            "agreed_before_first_difference": agreed}


def header(job: Job, implementations: list[str]) -> str:
    sparse = job.sparse_config()
    policy = "dense" if sparse is None else f"sparse {sparse.policy}, budget {sparse.token_budget} tokens"
    source = (f"built-in random Llama (4 layers, hidden 256, head dim {builtin_head_dim(job.device)}), random ids"
              if job.smoke else job.model)
    rows = 1 if job.smoke else len(job.questions)
    placement = " (tensor parallel)" if job.tp else " (device_map=auto)" if job.device_map else ""
    return (f"model: {source} | {job.device}{placement} | {job.dtype} | {rows} row(s) | up to {job.new_tokens} new "
            f"tokens | pages of {job.page_size} | prefill chunks: {job.prefill_chunk or 'off'} | {policy} | "
            f"runs: {', '.join(implementations)}")


def summary_table(results: list[dict]) -> str:
    on_cuda = results[0]["memory"]["kind"] == "cuda"
    memory_label = "peak memory (GiB)" if on_cuda else "peak RSS (GiB)"
    gib = lambda n: None if n is None else n / 2**30  # noqa: E731
    rows = [("cache", lambda r: r["cache"], "{:>16}"),
            ("prefill (s)", lambda r: r["prefill_s"], "{:>16.3f}"),
            ("prefill (tok/s)", lambda r: r["prefill_tok_s"], "{:>16.0f}"),
            ("decode (tok/s)", lambda r: r["decode_tok_s"], "{:>16.1f}"),
            ("end-to-end (s)", lambda r: r["end_to_end_s"], "{:>16.3f}"),
            (memory_label, lambda r: gib(r["memory"]["peak_bytes"]), "{:>16.3f}")]
    if on_cuda:
        rows.append(("  of which pages", lambda r: gib(r["memory"]["page_pool_bytes"]), "{:>16.3f}"))
    else:
        rows.append(("  added by generate", lambda r: gib(r["memory"]["added_bytes"]), "{:>16.3f}"))
    lines = [f"{'':22}" + "".join(f"{r['implementation']:>16}" for r in results)]
    for label, get, fmt in rows:
        cells = [get(r) for r in results]
        lines.append(f"{label:22}" + "".join(f"{'n/a':>16}" if c is None else fmt.format(c) for c in cells))
    return "\n".join(lines)


def print_report(job: Job, results: list[dict], comparison: dict | None, stream) -> None:
    first = results[0]
    print("\n" + summary_table(results), file=stream)
    memory = first["memory"]
    if memory["kind"] == "cpu-rss":
        print("peak RSS: the run's own process during generate() (model and libraries included); 'added': above "
              "its RSS when generate() started", file=stream)
    elif memory["kind"] == "cuda":
        print("peak memory: torch's peak allocation during generate() + flashcore's page pools", file=stream)
    for result in results:
        if result["cache_stats_text"]:
            print(f"{result['implementation']}: {result['cache_stats_text']}", file=stream)
        graphs = result["decode_graphs"]
        if graphs is not None and graphs["captures"]:
            print(f"{result['implementation']}: CUDA-graph decode, {graphs['captures']} capture(s) in "
                  f"{graphs['capture_seconds']:.2f} s and {graphs['compiles']} torch.compile(s) of the decode step "
                  f"in {graphs['compile_seconds']:.2f} s (both in the decode time), {graphs['replays']} replayed "
                  f"steps ({graphs['compiled_replays']} compiled), {graphs['eager_decode_steps']} eager decode steps",
                  file=stream)
            if graphs["compile_failures"]:
                print(f"  compiled decode fell back to the uncompiled forward: {graphs['compile_failures']}",
                      file=stream)
    if first["answers"] is not None and len(first["answers"]) > 1:
        for question, answer in zip(job.questions, first["answers"]):
            print(f"\nQ: {question}\nA ({first['implementation']}): {answer}", file=stream)
    if comparison is not None:
        same = "yes" if comparison["tokens_match"] else "NO"
        print(f"\ngenerated tokens identical to {comparison['implementation']}: {same} (per row, tokens before the "
              f"first difference: {comparison['agreed_before_first_difference']})", file=stream)
        if not comparison["tokens_match"] and job.sparse:
            print("(sparse decode reads a subset of the pages: differences from dense attention are expected once "
                  "the context exceeds the budget)", file=stream)


def json_record(job: Job, results: list[dict], comparison: dict | None) -> dict:
    runs = [{k: v for k, v in r.items() if k != "cache_stats_text"} for r in results]
    return {
        "smoke": job.smoke, "model": job.model, "device": job.device, "dtype": job.dtype, "tp": job.tp,
        "device_map": job.device_map, "questions": job.questions, "rows": len(results[0]["tokens"]),
        "prompt_tokens": results[0]["prompt_tokens"], "columns": results[0]["columns"],
        "max_new_tokens": job.new_tokens, "page_size": job.page_size, "prefill_chunk": job.prefill_chunk,
        "sparse": dataclasses.asdict(job.sparse_config()) if job.sparse else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "runs": runs, "compare": comparison,
    }


def main(argv: list[str] | None = None) -> int:
    job = parse_args(argv)
    stream = sys.stderr if job.json else sys.stdout
    show = is_reporting_rank()
    implementations = ["flashcore"] + ([job.compare] if job.compare else [])
    if show:
        if job.smoke:
            print(SMOKE_NOTE, file=stream)
        print(header(job, implementations), file=stream)
    try:
        results = run_all(job, implementations)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not show:
        return 0
    limit = results[0]["max_position_embeddings"]
    if limit and results[0]["columns"] + job.new_tokens > limit:
        print(f"note: prompt + new tokens ({results[0]['columns'] + job.new_tokens}) exceed the model's "
              f"max_position_embeddings ({limit})", file=stream)
    comparison = compare_tokens(results[0], results[1]) if len(results) > 1 else None
    print_report(job, results, comparison, stream)
    if job.json:
        print(json.dumps(json_record(job, results, comparison), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
