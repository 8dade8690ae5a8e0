"""Tensor parallelism (transformers' tp_plan="auto" under torchrun): two CPU processes over gloo, a tiny Llama split
by heads. flashcore generates the same tokens as sdpa, and each rank's PagedKVCache holds its local kv heads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SCRIPT = Path(__file__).parent / "distributed" / "tp_generate.py"


def run(checkpoint: Path, implementation: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), str(checkpoint), implementation]
    # CPU processes over gloo, also on a GPU machine (with CUDA visible, transformers would pick NCCL and one GPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_tensor_parallel_generate_matches_sdpa(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, pad_token_id=0, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    sdpa, flashcore = run(tmp_path, "sdpa"), run(tmp_path, "flashcore")
    assert flashcore["cache"] == "PagedKVCache" and flashcore["local_kv_heads"] == 1   # 2 kv heads over 2 ranks
    assert flashcore["tokens"] == sdpa["tokens"]
