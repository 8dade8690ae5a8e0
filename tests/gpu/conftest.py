"""Fixtures shared by the GPU tests."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SMALL_VOCAB = 512


@pytest.fixture(scope="module")
def small_llama():
    """A 3-layer bf16 Llama on cuda (head dim 64, GQA 4) with random weights, attention "flashcore"."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SMALL_VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flashcore", dtype=torch.bfloat16)
    return model.to("cuda").eval()
