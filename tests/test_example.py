"""examples/long_context_generate.py end to end, on a tiny checkpoint built offline (scripts/make_tiny_checkpoint.py).

Two runs of the script as a subprocess, started together (each spends most of its time importing torch and
transformers): question answering over a text file with two questions (a left-padded batch, the chat template,
chunked prefill, `--compare sdpa --json`), and the smoke default at tiny sizes. Bad arguments are checked in this
process (argparse exits with code 2 and names the flag). CPU only, a few seconds of compute.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashcore_hf import CACHE_KWARG, SparseConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "long_context_generate.py"
DOCUMENT = """\
Harbour notes, spring edition.
The harbour office opens at seven in the morning and closes at five in the evening. Ships longer than eighty metres
must request a pilot two hours before they enter the channel. The pilot boat is painted orange and carries the call
sign Kestrel. In March the office recorded 214 arrivals and 198 departures. The tide tables were prepared by Ines
Moreau and approved by the harbour master.
"""
QUESTIONS = ["Who prepared the tide tables?",
             "When does the harbour office open in the morning, when does it close in the evening, and who approved "
             "the tide tables?"]
NEW, CHUNK, PAGE = 6, 16, 8


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


example = _load(EXAMPLE, "long_context_generate")
tiny = _load(ROOT / "scripts" / "make_tiny_checkpoint.py", "make_tiny_checkpoint")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny checkpoint (model + tokenizer with a chat template) and a document, in a temporary directory."""
    directory = tmp_path_factory.mktemp("example")
    checkpoint = tiny.make_tiny_checkpoint(str(directory / "checkpoint"), max_positions=1024)
    document = directory / "harbour.txt"
    document.write_text(DOCUMENT, encoding="utf-8")
    return {"checkpoint": checkpoint, "document": str(document)}


def _start(args: list[str]) -> subprocess.Popen:
    # One thread: the models are tiny, and torch's OpenMP threads crawl on a CPU shared with other jobs.
    # CPU runs also on a GPU machine (the example would default to CUDA there; scripts/gpu_check.sh runs that).
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, str(EXAMPLE), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def runs(files) -> dict[str, tuple[int, str, str]]:
    """name -> (exit code, stdout, stderr) of the script's runs, started at once."""
    questions = [arg for q in QUESTIONS for arg in ("--question", q)]
    started = {
        "compare": _start(["--model", files["checkpoint"], "--prompt-file", files["document"], *questions,
                           "--new", str(NEW), "--prefill-chunk", str(CHUNK), "--page-size", str(PAGE),
                           "--compare", "sdpa", "--json"]),
        "smoke": _start(["--context", "96", "--new", "4"]),
    }
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = (process.returncode, stdout, stderr)
    return done


def test_compare_json_record(runs, files):
    code, stdout, stderr = runs["compare"]
    assert code == 0, stderr
    record = json.loads(stdout)  # stdout holds the JSON record only
    assert record["smoke"] is False and record["questions"] == QUESTIONS and record["rows"] == 2

    # The chat template made the prompts; rows of different lengths are left padded to the longest.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files["checkpoint"])
    prompts, templated = example.question_prompts(tokenizer, DOCUMENT, QUESTIONS)
    assert templated and all(p.startswith("<s><|user|>\n") and p.endswith("<|assistant|>\n") for p in prompts)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert record["prompt_tokens"] == lengths and lengths[0] != lengths[1]
    assert record["columns"] == max(lengths)

    flashcore, sdpa = record["runs"]
    assert (flashcore["implementation"], flashcore["cache"]) == ("flashcore", "PagedKVCache")
    assert (sdpa["implementation"], sdpa["cache"]) == ("sdpa", "DynamicCache")
    assert record["compare"]["tokens_match"] is True
    assert flashcore["tokens"] == sdpa["tokens"]
    for run in record["runs"]:
        assert run["prefill_chunks"] == math.ceil(record["columns"] / CHUNK)
        assert run["prefill_s"] > 0 and run["decode_tok_s"] > 0 and run["end_to_end_s"] >= run["prefill_s"]
        assert run["memory"]["peak_bytes"] > 0 and run["memory"]["kind"].startswith("cpu")
        assert len(run["tokens"]) == 2 and 1 <= run["decode_steps"] <= NEW
        assert len(run["answers"]) == 2 and all(isinstance(a, str) for a in run["answers"])
    assert sdpa["cache_stats"] is None

    # Each row's pages hold its real tokens only (left padding takes none): the prompt and every generated token but
    # the last, which no forward pass has seen.
    stats = flashcore["cache_stats"]
    stored = [n + flashcore["decode_steps"] - 1 for n in lengths]
    assert stats["page_size"] == PAGE and stats["num_layers"] == 4
    assert stats["pages_used"] == sum(math.ceil(n / PAGE) for n in stored)
    assert "generated tokens identical to sdpa: yes" in stderr
    assert "[flashcore] prefill:" in stderr and "[sdpa] prefill:" in stderr


def test_smoke_default_runs(runs):
    code, stdout, stderr = runs["smoke"]
    assert code == 0, stderr
    assert stdout.startswith("SMOKE RUN")
    for line in ("PagedKVCache", "prefill (s)", "decode (tok/s)", "end-to-end (s)", "peak RSS (GiB)",
                 "PagedKVCache: 2/"):  # 96 + 4 - 1 tokens in pages of 64
        assert line in stdout, stdout


def test_chunked_prefill_matches_unchunked(files):
    """generate(prefill_chunk_size=...) through PagedKVCache: the same tokens as one prefill forward, with chunks
    that end mid-page and rows whose first chunks are all padding."""
    questions = [arg for q in QUESTIONS for arg in ("--question", q)]
    job = example.parse_args(["--model", files["checkpoint"], "--prompt-file", files["document"], *questions,
                              "--new", str(NEW), "--page-size", str(PAGE), "--device", "cpu"])
    model, tokenizer = example.load_model(job, "flashcore")
    inputs = example.make_inputs(job, model, tokenizer)
    columns = inputs["input_ids"].shape[1]
    assert int(inputs["attention_mask"].sum(dim=1).min()) <= columns - CHUNK  # a row starts with a padding chunk
    sequences = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for chunk in (None, CHUNK, 7):
            kwargs = example.generation_kwargs(job, tokenizer, columns) | {"prefill_chunk_size": chunk}
            cache = example.make_cache(model, job, "flashcore", columns)
            with torch.inference_mode():
                out = model.generate(**inputs, **kwargs, **{CACHE_KWARG: cache})
            assert getattr(out, CACHE_KWARG) is cache
            sequences[chunk] = out.sequences
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sequences[CHUNK], sequences[None]) and torch.equal(sequences[7], sequences[None])


def test_sparse_flags_reach_the_cache(files):
    """--sparse/--budget become the PagedKVCache's SparseConfig, and the checkpoint decodes the batch with it: its
    layers 2-3 select pages (the first two stay dense) once a row is longer than the budget (a sink page and the 64
    most recent tokens: 9 pages of 8 = 72 tokens; rows here are over 100)."""
    questions = [arg for q in QUESTIONS for arg in ("--question", q)]
    job = example.parse_args(["--model", files["checkpoint"], "--prompt-file", files["document"], *questions,
                              "--new", "3", "--sparse", "topk", "--budget", "72", "--page-size", str(PAGE),
                              "--device", "cpu"])
    model, tokenizer = example.load_model(job, "flashcore")
    inputs = example.make_inputs(job, model, tokenizer)
    columns = inputs["input_ids"].shape[1]
    assert int(inputs["attention_mask"].sum(dim=1).min()) > 72
    cache = example.make_cache(model, job, "flashcore", columns)
    assert cache.sparse == SparseConfig(policy="topk", token_budget=72) and cache.page_size == PAGE
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = model.generate(**inputs, **example.generation_kwargs(job, tokenizer, columns),
                                 **{CACHE_KWARG: cache})
    finally:
        torch.set_num_threads(threads)
    assert out.sequences.shape[0] == 2 and columns < out.sequences.shape[1] <= columns + 3


BAD_ARGUMENTS = [
    (["--context", "0"], "--context"),
    (["--context", "-3"], "--context"),
    (["--new", "0"], "--new"),
    (["--new", "many"], "--new"),
    (["--page-size", "0"], "--page-size"),
    (["--prefill-chunk", "-1"], "--prefill-chunk"),
    (["--budget", "256"], "--budget"),
    (["--sparse", "topk", "--budget", "16"], "--budget"),  # less than one page of 64 tokens
    (["--sparse", "dense"], "--sparse"),
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "--dtype"),
    (["--question", "Who?"], "--question"),
    (["--prompt-file", "notes.txt"], "--prompt-file"),
    (["--tp"], "--tp"),
    (["--model", "/nonexistent/checkpoint", "--question", "Who?"], "--model"),
]


@pytest.mark.parametrize("argv,flag", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_naming_the_flag(argv, flag, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("extra,flag", [
    ([], "--question"),                                          # no question about the document
    (["--question", "Who?", "--context", "5"], "--context"),     # --context is the smoke run's
    (["--question", "Who?", "--prompt-file", "/nonexistent.txt"], "--prompt-file"),
    (["--question", "Who?", "--prompt-file", "-"], "--prompt-file"),  # stdin, empty
])
def test_bad_arguments_with_a_model(files, extra, flag, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    argv = ["--model", files["checkpoint"], *extra]
    if "--prompt-file" not in extra:
        argv += ["--prompt-file", files["document"]]
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_cuda_device_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_builtin_model_takes_a_head_dim_the_cuda_kernels_run():
    """The smoke run's model has head dim 64 on CUDA (the CUDA kernels take 64 and 128; 32 would fall back to SDPA
    there) and keeps 32 on the CPU (benchmarks/bench_cpu.py measures that model)."""
    assert example.builtin_head_dim("cuda") == 64 and example.builtin_head_dim("cuda:1") == 64
    assert example.builtin_head_dim("cpu") == 32
    config = example.builtin_config(128, 8, example.builtin_head_dim("cuda"))
    assert config.head_dim == 64 and config.num_attention_heads * config.head_dim == 512
